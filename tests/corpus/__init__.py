"""Real-model corpus helpers: locating models inside installed packages, realistic inputs, the row harness."""

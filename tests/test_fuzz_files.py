"""Random mutations of fixture files: a clear error with its exit code and nothing written, or a valid output."""

from __future__ import annotations

import random

import onnx
import pytest

from .conftest import FIXTURES, listing, run_cli

CASES = 40


def mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rnd.choice(["flip", "truncate", "insert", "zero_run", "swap"])
    if kind == "flip":
        for _ in range(rnd.randint(1, 16)):
            buf[rnd.randrange(len(buf))] ^= 1 << rnd.randrange(8)
    elif kind == "truncate":
        del buf[rnd.randrange(1, len(buf)):]
    elif kind == "insert":
        at = rnd.randrange(len(buf))
        buf[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))
    elif kind == "zero_run":
        at = rnd.randrange(len(buf))
        buf[at:at + rnd.randint(1, 256)] = b"\0" * len(buf[at:at + 256])
    else:
        a, b = sorted(rnd.randrange(len(buf)) for _ in range(2))
        buf[a:b] = buf[a:b][::-1]
    return bytes(buf)


def check_mutation(tmp_path, seed: int) -> None:
    rnd = random.Random(seed)
    source = rnd.choice(["cnn_opset11.onnx", "shared_weight.onnx", "mlp_gemm.onnx", "embedding.onnx"])
    path = tmp_path / "mutant.onnx"
    path.write_bytes(mutate((FIXTURES / source).read_bytes(), rnd))
    before = listing(tmp_path)
    out = tmp_path / "out.onnx"
    structured = ["--structured"] if rnd.random() < 0.5 else []
    code, _, err = run_cli(path, "--sparsity", "0.5", "-o", out, "--runs", "1", "--warmup", "0", *structured)
    assert code != 1, f"internal error on mutation {seed} of {source}: {err}"
    if code == 0:
        onnx.checker.check_model(str(out), full_check=True)
    else:
        errors = [line for line in err.splitlines() if line.startswith("onnxprune: error: ")]
        assert code in (3, 4, 5, 8) and len(errors) == 1, err
        assert listing(tmp_path) == before


@pytest.mark.parametrize("seed", range(CASES))
def test_mutated_files(tmp_path, seed):
    check_mutation(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(CASES, CASES + 1000))
def test_mutated_files_many(tmp_path, seed):
    check_mutation(tmp_path, seed)

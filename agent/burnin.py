"""The burn-in a GPU passes before a reset puts it back in service.

Run as its own process (`python -m agent.burnin --device cuda`), with
CUDA_VISIBLE_DEVICES naming the one GPU, so that a GPU that hangs or a
driver that crashes takes down this process and not the agent, and torch
is never loaded into the agent. It prints one JSON line: {"ok", "note"}.

- a matrix product on the GPU, checked against the same product computed in
  float64 on the CPU;
- a memory pattern check: a buffer filled with 0x00, 0xFF, 0xAA, 0x55 and
  its own index, each read back and compared.

Without torch the burn-in is skipped and says so (the reset goes ahead).
With `--device cpu` (simulated GPUs) the same checks run on the CPU, small.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SKIPPED_NO_TORCH = "burn-in skipped: torch is not installed on this host"


def burn_in(device: str, matmul_n: int, pattern_bytes: int) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"ok": True, "note": SKIPPED_NO_TORCH}
    if device == "cuda" and not torch.cuda.is_available():
        return {"ok": True, "note": "burn-in skipped: torch here has no CUDA"}
    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(1234)
    a = torch.randn(matmul_n, matmul_n, generator=gen, dtype=torch.float32)
    b = torch.randn(matmul_n, matmul_n, generator=gen, dtype=torch.float32)
    got = (a.to(dev) @ b.to(dev)).to("cpu", torch.float64)
    want = a.double() @ b.double()
    # float32 accumulation (TF32 on recent GPUs): allow a relative error that
    # a healthy GPU stays far below and a corrupting one does not.
    err = float((got - want).abs().max() / want.abs().max())
    if not err < 1e-2:
        return {"ok": False, "note": f"matrix product wrong by {err:.3g} (relative)"}
    n = max(1, pattern_bytes // 8)
    buf = torch.empty(n, dtype=torch.int64, device=dev)
    for name, fill in (("0x00", 0), ("0xFF", -1), ("0xAA", -0x5555555555555556),
                       ("0x55", 0x5555555555555555)):  # fmt: skip
        buf.fill_(fill)
        if not bool((buf == fill).all()):
            return {"ok": False, "note": f"memory pattern {name} read back wrong"}
    buf.copy_(torch.arange(n, dtype=torch.int64, device=dev))
    if not bool((buf == torch.arange(n, dtype=torch.int64, device=dev)).all()):
        return {"ok": False, "note": "memory address pattern read back wrong"}
    if dev.type == "cuda":
        torch.cuda.synchronize()
    where = "the GPU" if dev.type == "cuda" else "the CPU (simulated GPU)"
    return {
        "ok": True,
        "note": f"burn-in passed on {where}: {matmul_n}x{matmul_n} matmul, "
        f"{pattern_bytes >> 20} MiB memory patterns",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.burnin")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--matmul", type=int, default=4096)
    p.add_argument("--pattern-bytes", type=int, default=1 << 30)
    args = p.parse_args(argv)
    try:
        out = burn_in(args.device, args.matmul, args.pattern_bytes)
    except Exception as exc:  # a CUDA error is the answer, not a crash
        out = {"ok": False, "note": f"burn-in failed: {type(exc).__name__}: {exc}"[:500]}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small GPU job: shows what leptond gave it, then does some matrix work.

Uses torch on the GPU when torch and CUDA are there, numpy on the CPU otherwise.
"""

from __future__ import annotations

import os
import socket
import time


def main() -> None:
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    print(
        f"job {os.environ.get('LEPTON_JOB_ID')} rank {os.environ.get('LEPTON_TASK_RANK')} "
        f"on {socket.gethostname()}, GPUs [{gpus}]"
    )
    t0 = time.perf_counter()
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("no CUDA")
        dev = torch.device("cuda")
        a = torch.randn(4096, 4096, device=dev)
        for _ in range(10):
            a = (a @ a).tanh()
        torch.cuda.synchronize()
        print(f"torch on {torch.cuda.get_device_name(0)}: 10 matmuls of 4096x4096")
    except ImportError:
        import numpy as np

        a = np.random.default_rng(0).standard_normal((256, 256)) / 16
        for _ in range(10):
            a = np.tanh(a @ a)
        print("no CUDA here: numpy on the CPU, 10 matmuls of 256x256")
    print(f"done in {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()

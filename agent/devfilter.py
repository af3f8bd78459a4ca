"""Which device files a task may open: an eBPF device program (cgroup v2) or a
private mount namespace that covers the other GPUs' device files.

On cgroup v1 the devices controller does this job (agent/cgroups.py). On v2
the only device controller is a BPF_PROG_TYPE_CGROUP_DEVICE program attached
to the task's cgroup, as runc's devicefilter does; no controller has to be
enabled for it. The program here denies exactly the character devices it is
given (the GPUs that are not the task's) and allows everything else, so the
shared control devices (nvidiactl, nvidia-uvm, nvidia-caps...) stay open.
It is attached with BPF_F_ALLOW_MULTI, so programs on parent cgroups (such as
systemd's DevicePolicy) still apply: every program on the path must allow.

Where no program can be loaded or attached (no CAP_BPF, an old kernel, a
parent program attached without ALLOW_MULTI), the shim instead gives the
task a private mount namespace in which each of those device files is
covered by an empty file that only root may open.

Standard library only: the shim imports this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct

# bpf(2) syscall numbers by machine.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6  # attach type
_BPF_F_ALLOW_MULTI = 2
_BPF_DEVCG_DEV_CHAR = 2
_ATTR_SIZE = 128

_CLONE_NEWNS = 0x00020000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SLAVE = 1 << 19


class DeviceFilterError(Exception):
    """The device rules could not be put in place; one clear line."""


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def device_program(deny: list[tuple[int, int]]) -> bytes:
    """The program's instructions: deny the character devices (major, minor)
    in `deny`, allow every other access.

    The context is struct bpf_cgroup_dev_ctx {u32 access_type; u32 major;
    u32 minor;}, with the device type in the low 16 bits of access_type.
    """
    ldx_w, and_k, jne_k, jeq_k, mov_k, exit_ = 0x61, 0x57, 0x55, 0x15, 0xB7, 0x95
    if not deny:
        # The verifier refuses unreachable instructions: no deny block at all.
        return _insn(mov_k, 0, 0, 0, 1) + _insn(exit_)
    out = [
        _insn(ldx_w, 2, 1, 0),  # r2 = ctx->access_type
        _insn(and_k, 2, 0, 0, 0xFFFF),  # r2 = device type
        _insn(ldx_w, 3, 1, 4),  # r3 = ctx->major
        _insn(ldx_w, 4, 1, 8),  # r4 = ctx->minor
    ]
    # Each check jumps forward: a mismatch of type goes to "allow", a matching
    # (major, minor) pair to "deny". Both blocks sit after the last check.
    checks: list[tuple[int, int, int, bool]] = []  # (reg, imm, op, to_deny)
    checks.append((2, _BPF_DEVCG_DEV_CHAR, jne_k, False))
    for major, minor in sorted(set(deny)):
        # Two instructions per pair: "if major != M skip the next"; "if minor == m deny".
        checks.append((3, major, jne_k, False))
        checks.append((4, minor, jeq_k, True))
    n = len(checks)
    for i, (reg, imm, op, to_deny) in enumerate(checks):
        after = n - i - 1  # checks left after this one
        if op == jne_k and reg == 3:
            off = 1  # a different major: skip this pair's minor check
        elif to_deny:
            off = after + 2  # past the allow block
        else:
            off = after  # to the allow block
        out.append(_insn(op, reg, 0, off, imm))
    out += [_insn(mov_k, 0, 0, 0, 1), _insn(exit_), _insn(mov_k, 0, 0, 0, 0), _insn(exit_)]
    return b"".join(out)


def _bpf(cmd: int, attr: bytes) -> int:
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise DeviceFilterError(f"no bpf(2) syscall number known for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    ret = int(libc.syscall(nr, cmd, buf, _ATTR_SIZE))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def load_program(code: bytes) -> int:
    """Load a device program; returns its fd."""
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"Apache-2.0")
    attr = struct.pack(
        "<IIQQIIQ",
        _BPF_PROG_TYPE_CGROUP_DEVICE,
        len(code) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(lic),
        0,  # no verifier log
        0,
        0,
    )
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except OSError as e:
        raise DeviceFilterError(f"cannot load the device program: {e.strerror}") from None


def attach_device_filter(cgroup_dir: str, deny: list[tuple[int, int]]) -> None:
    """Deny the character devices in `deny` to every process in `cgroup_dir`
    (a cgroup v2 directory). The cgroup holds the program from then on; it
    goes when the cgroup is removed."""
    prog = load_program(device_program(deny))
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        os.close(prog)
        raise DeviceFilterError(f"cannot open cgroup {cgroup_dir}: {e.strerror}") from None
    try:
        attr = struct.pack("<IIII", cg, prog, _BPF_CGROUP_DEVICE, _BPF_F_ALLOW_MULTI)
        _bpf(_BPF_PROG_ATTACH, attr)
    except OSError as e:
        raise DeviceFilterError(
            f"cannot attach the device program to {cgroup_dir}: {e.strerror}"
        ) from None
    finally:
        os.close(cg)
        os.close(prog)


def probe(parent_dir: str) -> str | None:
    """None when device programs work under `parent_dir`, else why not: attach
    an allow-all program to a scratch child cgroup and remove it again."""
    scratch = os.path.join(parent_dir, ".devfilter-probe")
    try:
        os.makedirs(scratch, exist_ok=True)
    except OSError as e:
        return f"cannot create {scratch}: {e.strerror}"
    try:
        attach_device_filter(scratch, [])
    except DeviceFilterError as e:
        return str(e)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(scratch)
    return None


def hide_in_private_namespace(paths: list[str], cover: str, own_namespace: bool = True) -> None:
    """For the task's child before exec, as root: a private mount namespace in
    which each of `paths` is covered by `cover` (an empty root-owned file of
    mode 0), so the other GPUs' device files cannot be opened through them.
    Mounts made here never propagate back to the host (MS_SLAVE). With
    own_namespace=False the caller has made that namespace already (the
    task's private /tmp, agent/taskns.py)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret: int, what: str) -> None:
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    if own_namespace:
        check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        check(libc.mount(None, b"/", None, _MS_REC | _MS_SLAVE, None), "making / a slave mount")
    for p in paths:
        if os.path.lexists(p):
            check(libc.mount(os.fsencode(cover), os.fsencode(p), None, _MS_BIND, None), p)

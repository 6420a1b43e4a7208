"""Make OpenFWI-format seismic data by acoustic finite-difference modelling.

    python simulate_openfwi.py --family flatvel --out data/flatvel --files 10 --samples-per-file 100
    python simulate_openfwi.py --family curvefault --out data/cf --device cuda --batch-size 256

Writes OUT/data/data{i}.npy (N, 5, 1000, 70) and OUT/model/model{i}.npy (N, 1, 70, 70), float32,
i from 1, plus OUT/train.txt / OUT/val.txt (OpenFWI split lists, `data<TAB>label`, paths relative to OUT)
and OUT/dataset.json (normalisation constants and modelling parameters, which train_inversionnet.py
and eval_inversionnet.py take from beside the split lists or --data-root, or by `--stats`). Files
are written under a temporary name and renamed, and a re-run skips the files that are already
complete, so an interrupted generation resumes where it stopped. The same seed and arguments give byte-identical files on the same device.

Physics (OpenFWI's conventions): 2-D constant-density acoustic wave equation
u_tt = v^2 lap(u) + v^2 s, second order in time, fourth order in space, dx = 10 m, dt = 1 ms,
nt = 1000; 5 sources at columns 0, 17, 34, 52, 69 and 70 receivers, all in row 1 (10 m depth);
15 Hz Ricker wavelet, 147 samples long, peaking at 73 ms, injected as u += (v dt)^2 w[n].
Absorbing boundaries on all four sides (no free surface): a convolutional PML (C-PML, quadratic
damping profile, complex-frequency shift alpha = pi f) of --pml-width cells, 12 by default, which
keeps boundary reflections at 0.07-0.13 % of the recorded signal on the families' maps (tests/ hold them
under 0.15 %).

Engines: on CPU the time loop runs in a C++ kernel (simulate_openfwi_kernel.cpp: one sweep per time
step over each wavefield, threads sharing out the wavefields), compiled on first use through
torch.utils.cpp_extension and cached: 9x to 20x the PyTorch loop and 3.3x deepwave on the 2-core CPUs measured
(bench/RESULTS.md).
On CUDA the scheme runs as two Triton kernels per time step (Triton comes with PyTorch's CUDA builds):
about 640 samples/s on an H100 at batch 256, 3.3x the PyTorch loop (bench/RESULTS.md). Where neither
kernel is available (one line says why on CPU), the same scheme runs as PyTorch ops. The engines agree
to about 1e-6 relative L2.

Velocity families (70 x 70 cells, 1500-4500 m/s), each drawn from a numpy Generator:
- flatvel: 2-5 horizontal layers; interfaces at distinct depths with at least 4 cells between
  them; layer velocities uniform in [1500, 4500] sorted to increase with depth, except that with
  probability 0.25 in a model of three or more layers one adjacent pair is swapped (a low-velocity
  layer).
- curvevel: the flatvel layering bent by a smooth lateral curve, the sum of two sinusoids
  (amplitudes 2-8 and 0-3 cells, wavelengths 60-200 cells), scaled 0.7-1.3 per interface.
- flatfault / curvefault: flatvel / curvevel cut by 1-2 straight faults through the top edge at
  column 15-55, dipping 45-80 degrees to either side, with the hanging wall thrown 4-15 cells
  up or down.
"""
import argparse
import concurrent.futures
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
import warnings

SIGINT_AT_START = signal.getsignal(signal.SIGINT)  # Python's KeyboardInterrupt, unless a launcher set another
if __name__ == "__main__" and SIGINT_AT_START is signal.default_int_handler:  # (`cmd &` ignores it: left so)
    # a Ctrl-C in the seconds the imports below take exits at once (130), without a traceback
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import numpy as np
import torch
import torch.nn.functional as F

try:  # the CUDA engine's kernels; Triton comes with PyTorch's CUDA builds, and without it the PyTorch loop runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# ---- OpenFWI modelling constants ----
DX = 10.0
DT = 1e-3
NT = 1000
FREQ = 15.0
N_GRID = 70
SRC_COLS = (0, 17, 34, 52, 69)
SRC_ROW = 1
REC_ROW = 1
LABEL_MIN, LABEL_MAX = 1500.0, 4500.0
DATA_SHAPE, MODEL_SHAPE = (len(SRC_COLS), NT, N_GRID), (1, N_GRID, N_GRID)  # one sample of each file of a pair
# fourth-order central differences: second derivative and first derivative (times dx^2, dx)
C0, C1, C2 = -5.0 / 2.0, 4.0 / 3.0, -1.0 / 12.0
D1, D2 = 2.0 / 3.0, -1.0 / 12.0
# v dt / dx must stay below this for the 2nd-order-time, 4th-order-space scheme in 2-D
CFL_LIMIT = math.sqrt(3.0 / 8.0)
PML_WIDTH = 12  # cells: boundary error 0.07-0.13 % of the traces on the families' maps
# the CLI's floor, with 0.4-0.5 % (0.5 % at 7 cells, 1 % at 6, more than all of the trace at 0: data of
# another physics); simulate() itself takes any width, for the tests of its engines
MIN_PML_WIDTH = 8


class SimulationError(ValueError):
    """Bad input to the simulator; the CLI prints it on one line and exits 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help gives each flag's default, except None: the help of such a flag says what leaving it unset means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are SimulationErrors: one line instead of the usage text, exit 2. (The trainer
    has its own: this script imports nothing of it, so that it can be copied and used alone.)"""

    def __init__(self, **kwargs):  # whole flag names only, as the trainer's: a prefix is not taken for a flag
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        raise SimulationError(f"{message} (--help lists the flags)")


def get_args_parser():
    p = ArgumentParser(description="Make OpenFWI-format data by acoustic FD modelling.")
    p.add_argument("--family", default="flatvel", choices=sorted(FAMILIES),
                   help="velocity-model family")
    p.add_argument("--out", default=None, help="output directory (default data/FAMILY in the current directory; bash run.sh makes it in the repository's)")
    p.add_argument("--files", type=int, default=10, help="number of file pairs")
    p.add_argument("--samples-per-file", type=int, default=500, help="samples per file (OpenFWI: 500)")
    p.add_argument("--val-files", type=int, default=None,
                   help="files (the last ones) listed in val.txt; default: a fifth, at least 1 when --files > 1")
    p.add_argument("--seed", type=int, default=0, help="random seed (file i uses the stream [seed, i])")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to run the solver")
    p.add_argument("--batch-size", type=int, default=None,
                   help="velocity models simulated together; default 16 on CPU (8-32 are equally fast on 2 cores; 16 keeps "
                        "more cores evenly busy), 256 on CUDA")
    p.add_argument("--pml-width", type=int, default=PML_WIDTH, help=f"C-PML thickness in cells, {MIN_PML_WIDTH} to 100")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a tqdm progress bar")
    return p


# ---- forward modelling ----

def ricker(nt=NT, dt=DT, f=FREQ):
    """Ricker wavelet of length 2.2/f (147 samples at 15 Hz, 1 ms), peak 1 at its centre, zero after."""
    n = int(round(2.2 / f / dt))
    n += n % 2 == 0  # odd, so that the peak sits on a sample (73 ms at 15 Hz)
    t = (np.arange(n) - n // 2) * dt
    a = (math.pi * f * t) ** 2
    w = np.zeros(nt, dtype=np.float64)
    m = min(n, nt)
    w[:m] = ((1.0 - 2.0 * a) * np.exp(-a))[:m]
    return w


def cpml_coefficients(n, pml, vmax, dt, dx, f, reflection=1e-4):
    """C-PML recursion coefficients (a, b) along one axis of length n + 2 * pml (float64).

    Quadratic damping d(x) = d0 (x/L)^2, frequency shift alpha = pi f (1 - x/L), kappa = 1:
    psi <- b psi + a du/dx, with b = exp(-(d + alpha) dt) and a = d / (d + alpha) (b - 1).
    """
    idx = torch.arange(n + 2 * pml, dtype=torch.float64)
    depth = (torch.clamp(pml - idx, min=0) + torch.clamp(idx - (n + pml - 1), min=0)) / max(pml, 1)
    d0 = 3.0 * vmax * math.log(1.0 / reflection) / (2.0 * pml * dx) if pml > 0 else 0.0
    d = d0 * depth ** 2
    alpha = math.pi * f * (1.0 - depth)
    b = torch.exp(-(d + alpha) * dt)
    a = torch.where(d > 0, d / (d + alpha) * (b - 1.0), torch.zeros_like(d))
    return a, b


def _pair_view(t, dim, width):
    """The first and the last `width` entries of t along dim (-1 or -2) as one strided view,
    with a new axis of size 2 before the last two. One kernel then updates both boundary strips."""
    size, stride = list(t.shape), list(t.stride())
    d = t.dim() + dim
    gap = (size[d] - width) * stride[d]
    size[d] = width
    return t.as_strided(size[:-2] + [2] + size[-2:], stride[:-2] + [gap] + stride[-2:], t.storage_offset())


def _d1(t, dim):
    """Fourth-order first difference (times dx) of the entries 2..n-3 along dim."""
    n = t.shape[dim] - 4
    return (t.narrow(dim, 3, n) - t.narrow(dim, 1, n)).mul_(D1).add_(t.narrow(dim, 4, n) - t.narrow(dim, 0, n), alpha=D2)


def _d2(t, dim):
    """Fourth-order second difference (times dx^2) of the entries 2..n-3 along dim."""
    n = t.shape[dim] - 4
    s = (t.narrow(dim, 3, n) + t.narrow(dim, 1, n)).mul_(C1)
    return s.add_(t.narrow(dim, 4, n) + t.narrow(dim, 0, n), alpha=C2).add_(t.narrow(dim, 2, n), alpha=C0)


def check_velocity(velocity, dx=DX, dt=DT):
    if not torch.is_tensor(velocity) or velocity.dim() != 3:
        raise SimulationError(f"velocity must be a tensor of shape (B, nz, nx), got {getattr(velocity, 'shape', type(velocity))}")
    if velocity.shape[1] < 2 or velocity.shape[2] < 1 or velocity.shape[0] < 1:
        raise SimulationError(f"velocity shape {tuple(velocity.shape)} is too small")
    if not torch.isfinite(velocity).all():
        raise SimulationError("velocity contains NaN or Inf")
    vmin, vmax = velocity.min().item(), velocity.max().item()
    if vmin <= 0:
        raise SimulationError(f"velocity must be positive, got a minimum of {vmin:g} m/s")
    if vmax * dt / dx >= CFL_LIMIT:
        raise SimulationError(f"velocity {vmax:g} m/s is unstable at dt={dt:g} s, dx={dx:g} m "
                              f"(need v*dt/dx < {CFL_LIMIT:.3f}, i.e. v < {CFL_LIMIT * dx / dt:.0f} m/s)")


def resolve_device(name):
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise SimulationError(f"--device {name} requested but CUDA is not available")
    return torch.device(name)


@torch.no_grad()
def simulate(velocity, dx=DX, dt=DT, nt=NT, f=FREQ, src_cols=SRC_COLS, src_row=SRC_ROW, rec_row=REC_ROW,
             pml_width=PML_WIDTH, engine="auto"):
    """Shot gathers for a batch of velocity maps.

    velocity: float tensor (B, nz, nx) in m/s. Returns float32 (B, len(src_cols), nt, nx) on the
    velocity's device, receivers at every column of row `rec_row`. The PML strength uses
    max(LABEL_MAX, v.max()) so that a sample's traces do not depend on which other samples
    share its batch (while every map stays within LABEL_MAX, as the families' maps do).
    engine "auto": on CPU the C++ kernel (cpu_kernel()) where it can be built, on CUDA the Triton
    kernels where triton is installed, otherwise the PyTorch loop; "torch": always the PyTorch loop;
    "triton": the Triton kernels (on CPU only under TRITON_INTERPRET=1). The engines agree to about
    1e-6 relative L2 (float32 rounding in another order).
    """
    if engine not in ("auto", "torch", "triton"):
        raise SimulationError(f"engine must be 'auto', 'torch' or 'triton', got {engine!r}")
    if engine == "triton" and triton is None:
        raise SimulationError("engine 'triton' needs the triton package (it comes with PyTorch's CUDA builds)")
    check_velocity(velocity, dx, dt)
    dev = velocity.device
    v = velocity.to(dtype=torch.float32)
    B, nz, nx = v.shape
    if isinstance(pml_width, bool) or not isinstance(pml_width, (int, np.integer)) or pml_width < 0:
        raise SimulationError(f"pml_width must be a whole number of cells >= 0, got {pml_width!r}")
    pml = int(pml_width)
    if not all(0 <= c < nx for c in src_cols) or not (0 <= src_row < nz and 0 <= rec_row < nz):
        raise SimulationError(f"source/receiver positions outside the {nz}x{nx} grid")
    H, W = nz + 2 * pml, nx + 2 * pml
    vmax = max(float(LABEL_MAX), v.max().item())
    sw = pml + 2  # strip width: the PML plus the 2 cells its psi derivative reaches into
    sw = min(sw, H // 2, W // 2)

    def strip_coeffs(n, shape):
        a, b = cpml_coefficients(n, pml, vmax, dt, dx, f)
        L = a.numel()
        a = torch.stack([a[:sw], a[L - sw:]]).view(shape).to(dev, torch.float32)
        b = torch.stack([b[:sw], b[L - sw:]]).view(shape).to(dev, torch.float32)
        return a, b

    coeffs = strip_coeffs(nx, (2, 1, sw)) + strip_coeffs(nz, (2, sw, 1))  # ax, bx, az, bz
    # (v dt / dx)^2: the stencils are unscaled, so dx^2 is folded in here
    v2 = (F.pad(v[:, None], (pml, pml, pml, pml), mode="replicate") * (dt / dx)) ** 2  # (B,1,H,W)
    # source term (v dt)^2 w[n]: with dx^2 folded into v2, the wavelet carries dx^2
    wavelet = torch.as_tensor(ricker(nt, dt, f) * dx * dx, dtype=torch.float32, device=dev)
    geometry = (v2, coeffs, wavelet, src_cols, src_row, rec_row, pml, sw, nx)
    kernel = cpu_kernel() if engine == "auto" and dev.type == "cpu" else None
    if kernel is not None:
        return _simulate_kernel(kernel, *geometry)
    if engine == "triton" or (engine == "auto" and dev.type == "cuda" and triton is not None):
        return _simulate_triton(*geometry)
    return _simulate_torch(*geometry)


def _simulate_torch(v2, coeffs, wavelet, src_cols, src_row, rec_row, pml, sw, nx):
    """simulate() in PyTorch ops, on any device: all B x shots wavefields advance together in one
    tensor, ~60 ops per time step. The fallback: on CUDA without Triton, on CPU without the C++ kernel."""
    B, _, H, W = v2.shape
    S, nt, dev = len(src_cols), wavelet.numel(), v2.device
    ax, bx, az, bz = coeffs
    f32 = dict(dtype=torch.float32, device=dev)  # not the default dtype, which a caller may have changed
    u = torch.zeros(B, S, H + 4, W + 4, **f32)  # 2-cell zero halo for the 5-point stencils
    u_old = torch.zeros_like(u)
    psi_x = torch.zeros(B, S, 2, H, sw + 4, **f32)
    zeta_x = torch.zeros(B, S, 2, H, sw, **f32)
    psi_z = torch.zeros(B, S, 2, sw + 4, W, **f32)
    zeta_z = torch.zeros(B, S, 2, sw, W, **f32)
    lap = torch.empty(B, S, H, W, **f32)
    s2 = torch.empty_like(lap)
    lap_x, lap_z = _pair_view(lap, -1, sw), _pair_view(lap, -2, sw)
    shot = torch.arange(S, device=dev)
    sz, sx = src_row + pml + 2, torch.as_tensor(src_cols, device=dev) + pml + 2
    src_scale = v2[:, 0, src_row + pml, sx - 2]  # (B, S)
    out = torch.empty(B, S, nt, nx, **f32)
    rz = rec_row + pml + 2
    for n in range(nt):
        c = u[..., 2:-2, 2:-2]
        # interior Laplacian over the whole grid
        torch.add(u[..., 2:-2, 1:-3], u[..., 2:-2, 3:-1], out=lap)
        lap += u[..., 1:-3, 2:-2]
        lap += u[..., 3:-1, 2:-2]
        torch.add(u[..., 2:-2, :-4], u[..., 2:-2, 4:], out=s2)
        s2 += u[..., :-4, 2:-2]
        s2 += u[..., 4:, 2:-2]
        lap.mul_(C1).add_(s2, alpha=C2).add_(c, alpha=2.0 * C0)
        # C-PML corrections, only on the boundary strips: lap += d(psi)/dx + zeta per axis
        for axis, P, Z, LAP, a, b in ((-1, psi_x, zeta_x, lap_x, ax, bx), (-2, psi_z, zeta_z, lap_z, az, bz)):
            U = _pair_view(u[..., 2:-2, :] if axis == -1 else u[..., 2:-2], axis, sw + 4)
            P.narrow(axis, 2, sw).mul_(b).addcmul_(a, _d1(U, axis))
            dpsi = _d1(P, axis)
            Z.mul_(b).addcmul_(a, _d2(U, axis).add_(dpsi))
            LAP += dpsi
            LAP += Z
        nxt = u_old[..., 2:-2, 2:-2]
        nxt.neg_().add_(c, alpha=2.0).addcmul_(v2, lap)
        u_old[:, shot, sz, sx] += src_scale * wavelet[n]
        u, u_old = u_old, u
        out[:, :, n] = u[..., rz, 2 + pml:2 + pml + nx]
    return out


# ---- the CUDA kernel ----
# On CUDA the PyTorch loop is bound by its ~60 launches and passes over memory per time step (about 200
# samples/s on an H100 at batch 256). Two Triton kernels per time step do the same scheme in two passes: the psi
# update on the boundary strips, then one sweep that reads each wavefield once and writes u(t + dt),
# the source and the receivers' row.
if triton is not None:
    _C0, _C1, _C2, _D1, _D2 = (tl.constexpr(c) for c in (C0, C1, C2, D1, D2))  # what a @triton.jit body can read

    @triton.jit
    def _tap(ptr, z, x, H, W, mask):
        """ptr[z, x] of an (H, W) plane, 0 outside it (the zero halo of the other engines)."""
        return tl.load(ptr + z * W + x, mask=mask & (z >= 0) & (z < H) & (x >= 0) & (x < W), other=0.0)

    @triton.jit
    def _strip_tap(ptr, z, x, H, W, sw, pos, side, axis_len, mask):
        """As _tap, but 0 unless `pos` (x or z) lies on the strip `side` (0 first, 1 last) of its axis:
        psi has a zero halo around each strip, so the two strips never see each other's values."""
        on = tl.where(side == 0, pos < sw, pos >= axis_len - sw) & (pos >= 0) & (pos < axis_len)
        return _tap(ptr, z, x, H, W, mask & on)

    @triton.jit
    def _psi_kernel(u, psi_x, psi_z, ax, bx, az, bz, H, W, sw, BZ: tl.constexpr, BX: tl.constexpr):
        """psi <- b psi + a du/dx on the strips of both axes, for wavefield program_id(0)."""
        plane = tl.program_id(0).to(tl.int64) * H * W
        z = tl.program_id(1) * BZ + tl.arange(0, BZ)[:, None]
        x = tl.program_id(2) * BX + tl.arange(0, BX)[None, :]
        inside = (z < H) & (x < W)
        u, psi_x, psi_z = u + plane, psi_x + plane, psi_z + plane
        for_x = inside & ((x < sw) | (x >= W - sw))
        kx = tl.where(x < sw, x, x - (W - 2 * sw))  # index into the (2, sw) coefficients
        a, b = tl.load(ax + kx, mask=for_x, other=0.0), tl.load(bx + kx, mask=for_x, other=0.0)
        du = ((_tap(u, z, x + 1, H, W, for_x) - _tap(u, z, x - 1, H, W, for_x)) * _D1
              + _D2 * (_tap(u, z, x + 2, H, W, for_x) - _tap(u, z, x - 2, H, W, for_x)))
        p = tl.load(psi_x + z * W + x, mask=for_x, other=0.0)
        tl.store(psi_x + z * W + x, p * b + a * du, mask=for_x)
        for_z = inside & ((z < sw) | (z >= H - sw))
        kz = tl.where(z < sw, z, z - (H - 2 * sw))
        a, b = tl.load(az + kz, mask=for_z, other=0.0), tl.load(bz + kz, mask=for_z, other=0.0)
        du = ((_tap(u, z + 1, x, H, W, for_z) - _tap(u, z - 1, x, H, W, for_z)) * _D1
              + _D2 * (_tap(u, z + 2, x, H, W, for_z) - _tap(u, z - 2, x, H, W, for_z)))
        p = tl.load(psi_z + z * W + x, mask=for_z, other=0.0)
        tl.store(psi_z + z * W + x, p * b + a * du, mask=for_z)

    @triton.jit(do_not_specialize=["n"])  # one compiled kernel for every time step
    def _sweep_kernel(u, u_old, v2, psi_x, zeta_x, psi_z, zeta_z, ax, bx, az, bz, src_cols, out, w, n,
                      S, H, W, sw, nt, nx, pml, src_z, rec_z, BZ: tl.constexpr, BX: tl.constexpr):
        """u_old <- 2 u - u_old + v2 (lap u + C-PML terms), plus the source; the receivers' row to out[:, n]."""
        i = tl.program_id(0).to(tl.int64)
        plane = i * H * W
        z = tl.program_id(1) * BZ + tl.arange(0, BZ)[:, None]
        x = tl.program_id(2) * BX + tl.arange(0, BX)[None, :]
        inside = (z < H) & (x < W)
        u, u_old = u + plane, u_old + plane
        psi_x, zeta_x, psi_z, zeta_z = psi_x + plane, zeta_x + plane, psi_z + plane, zeta_z + plane
        c = tl.load(u + z * W + x, mask=inside, other=0.0)
        ux1 = _tap(u, z, x - 1, H, W, inside) + _tap(u, z, x + 1, H, W, inside)
        ux2 = _tap(u, z, x - 2, H, W, inside) + _tap(u, z, x + 2, H, W, inside)
        uz1 = _tap(u, z - 1, x, H, W, inside) + _tap(u, z + 1, x, H, W, inside)
        uz2 = _tap(u, z - 2, x, H, W, inside) + _tap(u, z + 2, x, H, W, inside)
        lap = (ux1 + uz1) * _C1 + _C2 * (ux2 + uz2) + 2.0 * _C0 * c
        # x strips: lap += d(psi_x)/dx + zeta_x, zeta_x <- b zeta_x + a (d2u/dx2 + d(psi_x)/dx)
        on = inside & ((x < sw) | (x >= W - sw))
        side = (x >= sw).to(tl.int32)
        k = tl.where(x < sw, x, x - (W - 2 * sw))
        dpsi = ((_strip_tap(psi_x, z, x + 1, H, W, sw, x + 1, side, W, on)
                 - _strip_tap(psi_x, z, x - 1, H, W, sw, x - 1, side, W, on)) * _D1
                + _D2 * (_strip_tap(psi_x, z, x + 2, H, W, sw, x + 2, side, W, on)
                                          - _strip_tap(psi_x, z, x - 2, H, W, sw, x - 2, side, W, on)))
        d2 = ux1 * _C1 + _C2 * ux2 + _C0 * c
        zeta = (tl.load(zeta_x + z * W + x, mask=on, other=0.0) * tl.load(bx + k, mask=on, other=0.0)
                + tl.load(ax + k, mask=on, other=0.0) * (d2 + dpsi))
        tl.store(zeta_x + z * W + x, zeta, mask=on)
        lap = tl.where(on, (lap + dpsi) + zeta, lap)
        # z strips, the same along z
        on = inside & ((z < sw) | (z >= H - sw))
        side = (z >= sw).to(tl.int32)
        k = tl.where(z < sw, z, z - (H - 2 * sw))
        dpsi = ((_strip_tap(psi_z, z + 1, x, H, W, sw, z + 1, side, H, on)
                 - _strip_tap(psi_z, z - 1, x, H, W, sw, z - 1, side, H, on)) * _D1
                + _D2 * (_strip_tap(psi_z, z + 2, x, H, W, sw, z + 2, side, H, on)
                                          - _strip_tap(psi_z, z - 2, x, H, W, sw, z - 2, side, H, on)))
        d2 = uz1 * _C1 + _C2 * uz2 + _C0 * c
        zeta = (tl.load(zeta_z + z * W + x, mask=on, other=0.0) * tl.load(bz + k, mask=on, other=0.0)
                + tl.load(az + k, mask=on, other=0.0) * (d2 + dpsi))
        tl.store(zeta_z + z * W + x, zeta, mask=on)
        lap = tl.where(on, (lap + dpsi) + zeta, lap)
        vv = tl.load(v2 + (i // S) * H * W + z * W + x, mask=inside, other=0.0)
        nxt = (2.0 * c - tl.load(u_old + z * W + x, mask=inside, other=0.0)) + vv * lap
        src_x = tl.load(src_cols + i % S) + pml
        nxt += tl.where((z == src_z) & (x == src_x), vv * w, 0.0)  # (v dt / dx)^2 dx^2 w[n] at the source
        tl.store(u_old + z * W + x, nxt, mask=inside)
        rec = inside & (z == rec_z) & (x >= pml) & (x < pml + nx)
        tl.store(out + (i * nt + n) * nx + (x - pml) + z * 0, nxt, mask=rec)


def _simulate_triton(v2, coeffs, wavelet, src_cols, src_row, rec_row, pml, sw, nx):
    """simulate() through the two Triton kernels: all B x shots wavefields as (H, W) planes without halo
    (taps outside a plane read 0), psi and zeta as whole planes of which only the strips are touched."""
    B, _, H, W = v2.shape
    S, nt, dev = len(src_cols), wavelet.numel(), v2.device
    u, u_old, psi_x, zeta_x, psi_z, zeta_z = (torch.zeros(B * S, H, W, dtype=torch.float32, device=dev) for _ in range(6))
    ax, bx, az, bz = (t.reshape(-1).contiguous() for t in coeffs)
    cols = torch.as_tensor(src_cols, dtype=torch.int64, device=dev)
    out = torch.empty(B, S, nt, nx, dtype=torch.float32, device=dev)
    v2 = v2.contiguous()
    BZ, BX = 8, triton.next_power_of_2(W)
    grid = (B * S, triton.cdiv(H, BZ), triton.cdiv(W, BX))
    for n, w in enumerate(wavelet.tolist()):
        _psi_kernel[grid](u, psi_x, psi_z, ax, bx, az, bz, H, W, sw, BZ=BZ, BX=BX)
        _sweep_kernel[grid](u, u_old, v2, psi_x, zeta_x, psi_z, zeta_z, ax, bx, az, bz, cols, out, w, n,
                            S, H, W, sw, nt, nx, pml, src_row + pml, rec_row + pml, BZ=BZ, BX=BX)
        u, u_old = u_old, u
    return out


# ---- the CPU kernel ----

KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "simulate_openfwi_kernel.cpp")
_kernel = None  # the loaded module, or False once it could not be built


def cpu_kernel():
    """The C++ kernel of simulate_openfwi_kernel.cpp, compiled on first use by torch.utils.cpp_extension
    (about 10 s, once: the build is cached under ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR).
    None where it cannot be built (no compiler, no ninja, source missing, ...): simulate() then runs
    the PyTorch loop, and this prints one line saying why, once per process."""
    global _kernel
    if _kernel is None:
        try:
            _kernel = _build_kernel()
        except Exception as e:  # whatever stops the build, the PyTorch loop gives the same traces
            print(f"simulate_openfwi: C++ kernel unavailable ({_reason(e)}); using the slower PyTorch loop",
                  file=sys.stderr)
            _kernel = False
    return _kernel or None


def _reason(e):
    """A build failure in one short line: the compiler's first error if there is one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return next((line for line in lines[1:] if "error" in line.lower()), lines[0])[:200]


def _build_kernel():
    from torch.utils import cpp_extension  # here, not at the top: it imports setuptools, which only a build needs
    if not os.path.isfile(KERNEL_SOURCE):
        raise FileNotFoundError(f"{KERNEL_SOURCE} not found")
    cxx = os.environ.get("CXX", "c++")  # what cpp_extension compiles with
    if shutil.which(cxx) is None:
        raise FileNotFoundError(f"no C++ compiler {cxx}")
    if not cpp_extension.is_ninja_available():
        raise FileNotFoundError("no ninja, which torch.utils.cpp_extension builds with")
    # -march=native ties the build to this CPU: its flags name the cache entry, so that a home
    # directory shared with other machines never loads a build made for another instruction set
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        cpu = platform.processor()
    name = f"simulate_openfwi_kernel_{hashlib.sha1(f'{platform.machine()} {cpu}'.encode()).hexdigest()[:10]}"
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its compiler-compatibility banners; a failed build raises anyway
    try:
        with warnings.catch_warnings(), one_build_at_a_time(cpp_extension, name):
            warnings.simplefilter("ignore")
            return cpp_extension.load(name, [KERNEL_SOURCE], extra_cflags=["-O3", "-march=native", "-fopenmp-simd"])
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def one_build_at_a_time(cpp_extension, name):
    """Our builds of the kernel one at a time, under a lock that the OS releases however its holder ends.
    Inside it no build of ours is under way, so a `lock` file in the build folder (torch's own build lock,
    which torch waits on for ever) was left by a build killed outright (SIGKILL, a power cut): it goes. Where
    the file system takes no such lock (some network homes), the build goes on as torch alone does it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")  # where cpp_extension builds: ROOT/NAME, or DEFAULT/pyXY_cpu/NAME
    folders = os.path.join(glob.escape(root), name) if root else os.path.join(
        glob.escape(cpp_extension.get_default_build_root()), "*", name)
    root = root or cpp_extension.get_default_build_root()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{name}.building"), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("simulate_openfwi: waiting for another process's build of the C++ kernel", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # ENOLCK, say: no lock, so no telling a stale torch lock from a live one
            yield
            return
        for stale in glob.glob(os.path.join(folders, "lock")):
            os.remove(stale)
        yield


def _simulate_kernel(kernel, v2, coeffs, wavelet, src_cols, src_row, rec_row, pml, sw, nx):
    """simulate() through the C++ kernel, on torch.get_num_threads() threads that each take whole
    wavefields (model x shot) in turn. It reads raw pointers, so every tensor it gets is made here a
    contiguous float32 / int64 CPU tensor, whatever default dtype or device the caller has set."""
    B, _, H, W = v2.shape
    S, nt = len(src_cols), wavelet.numel()
    arrays = [t.contiguous() for t in (v2, *coeffs, wavelet)]  # float32 CPU tensors already
    cols = torch.as_tensor(src_cols, dtype=torch.int64, device="cpu").contiguous()
    out = torch.empty(B, S, nt, nx, dtype=torch.float32, device="cpu")
    kernel.simulate(B, S, H, W, sw, nt, nx, pml, src_row, rec_row, *(t.data_ptr() for t in arrays),
                    cols.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


# ---- velocity families ----

def _layers(rng, n=N_GRID):
    """Interface depths (k,) and layer velocities (k+1,) for one flat layered model."""
    n_layers = int(rng.integers(2, 6))
    while True:
        depths = np.sort(rng.choice(np.arange(4, n - 3), size=n_layers - 1, replace=False))
        if n_layers == 2 or np.diff(depths).min() >= 4:
            break
    vel = np.sort(rng.uniform(LABEL_MIN, LABEL_MAX, n_layers))
    if n_layers > 2 and rng.random() < 0.25:
        i = int(rng.integers(0, n_layers - 1))
        vel[i], vel[i + 1] = vel[i + 1], vel[i]
    return depths.astype(np.float64), vel


def _curve(rng, n=N_GRID):
    x = np.arange(n)
    c = np.zeros(n)
    for amp_lo, amp_hi in ((2.0, 8.0), (0.0, 3.0)):
        amp, lam, phase = rng.uniform(amp_lo, amp_hi), rng.uniform(60, 200), rng.uniform(0, 2 * np.pi)
        c += amp * np.sin(2 * np.pi * x / lam + phase)
    return c


def _paint(vel, interfaces_x, zeff):
    """Velocity at effective depths zeff (n, n) given interface depth curves (k, n)."""
    k = (zeff[None] >= interfaces_x[:, None, :]).sum(0)
    return vel[k]


def _faults(rng):
    """1-2 faults through the top edge of the 70-cell grid: (column, dip, side, throw)."""
    out = []
    for _ in range(int(rng.integers(1, 3))):
        x0 = rng.uniform(15, 55)
        dip = np.deg2rad(rng.uniform(45, 80))
        side = rng.choice([-1.0, 1.0])
        throw = rng.uniform(4, 15) * rng.choice([-1.0, 1.0])
        out.append((x0, dip, side, throw))
    return out


def _model(rng, curved, faulted, n=N_GRID):
    depths, vel = _layers(rng, n)
    if curved:
        base = _curve(rng, n)
        scale = rng.uniform(0.7, 1.3, size=(len(depths), 1))
        interfaces = depths[:, None] + scale * base[None]
    else:
        interfaces = np.repeat(depths[:, None], n, axis=1)
    z, x = np.mgrid[0:n, 0:n].astype(np.float64)
    zeff = z.copy()
    if faulted:
        for x0, dip, side, throw in _faults(rng):
            hanging = (x - x0 - side * z / np.tan(dip)) * side > 0
            zeff = np.where(hanging, zeff - throw, zeff)
    return _paint(vel, interfaces, zeff).astype(np.float32)


def flatvel(rng, batch, n=N_GRID):
    """(batch, n, n) float32 flat layered velocity maps in m/s."""
    return np.stack([_model(rng, False, False, n) for _ in range(batch)])


def curvevel(rng, batch, n=N_GRID):
    """(batch, n, n) float32 curved layered velocity maps in m/s."""
    return np.stack([_model(rng, True, False, n) for _ in range(batch)])


def flatfault(rng, batch, n=N_GRID):
    """(batch, n, n) float32 flat layers cut by 1-2 dipping faults."""
    return np.stack([_model(rng, False, True, n) for _ in range(batch)])


def curvefault(rng, batch, n=N_GRID):
    """(batch, n, n) float32 curved layers cut by 1-2 dipping faults."""
    return np.stack([_model(rng, True, True, n) for _ in range(batch)])


FAMILIES = {"flatvel": flatvel, "curvevel": curvevel, "flatfault": flatfault, "curvefault": curvefault}


# ---- files ----

def refuse_non_file(path):
    """Renaming onto a directory fails only after the write, and onto a device replaces it: refuse first."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise SimulationError(f"{path} exists and is not a regular file")


def write_atomic(path, write):
    """WRITE(file) to a temporary name in the same directory, fsync, then rename over PATH: the file is
    either the old one or the whole new one."""
    refuse_non_file(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npy_atomic(path, array):
    write_atomic(path, lambda fh: np.save(fh, array))


def write_text_atomic(path, text):
    write_atomic(path, lambda fh: fh.write(text.encode()))


def npy_complete(path, shape):
    """True if `path` is a float32 .npy of exactly `shape` whose size matches its header."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, OverflowError):  # OverflowError: a negative size in the header
        return False
    return isinstance(arr, np.ndarray) and arr.shape == tuple(shape) and arr.dtype == np.float32  # not a zip archive


def pair_paths(out, i):
    return os.path.join(out, "data", f"data{i}.npy"), os.path.join(out, "model", f"model{i}.npy")


def check_args(args):
    for name in ("files", "samples_per_file"):
        if getattr(args, name) <= 0:
            raise SimulationError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise SimulationError(f"--batch-size must be positive, got {args.batch_size}")
    if args.pml_width < MIN_PML_WIDTH:
        raise SimulationError(f"--pml-width must be at least {MIN_PML_WIDTH} (a thinner absorber reflects 0.5 % of the "
                              f"trace or more), got {args.pml_width}")
    if args.pml_width > 100:  # the model is 70 cells wide; the default is 12
        raise SimulationError(f"--pml-width must be at most 100, got {args.pml_width}")
    if args.out is None:  # one family's set never lands in (or is refused over) another's folder
        args.out = os.path.join("data", args.family)
    if not args.out.strip():
        raise SimulationError("--out: an empty path")
    if args.seed < 0:  # numpy's seed streams take non-negative integers only
        raise SimulationError(f"--seed must be >= 0, got {args.seed}")
    if args.val_files is None:
        args.val_files = max(1, args.files // 5) if args.files > 1 else 0
    if not 0 <= args.val_files < args.files:
        raise SimulationError(f"--val-files must be in [0, --files), got {args.val_files} with --files {args.files}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SimulationError(f"--out {args.out} exists and is not a directory")


def check_capacity(args):
    """Refuse sizes this machine cannot hold, before any work: two files are in memory at a time (one
    simulated, one being written), and every file goes to --out's disk (less what is there already)."""
    sample = 4 * (math.prod(DATA_SHAPE) + math.prod(MODEL_SHAPE))  # float32 shot gathers and velocity map

    def gb(n):
        return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"
    memory = available_memory()
    if memory is not None and 2 * args.samples_per_file * sample > memory:
        raise SimulationError(f"--samples-per-file {args.samples_per_file}: a file is {gb(args.samples_per_file * sample)} "
                              f"and two are held in memory, but {gb(memory)} is available; make more files of fewer samples")
    base = os.path.abspath(args.out)
    while not os.path.isdir(base):
        base = os.path.dirname(base)
    there = sum(os.path.getsize(os.path.join(d, f)) for d in (os.path.join(args.out, "data"), os.path.join(args.out, "model"))
                if os.path.isdir(d) for f in os.listdir(d))
    need, free = args.files * args.samples_per_file * sample, shutil.disk_usage(base).free
    if need > free + there:
        raise SimulationError(f"--files {args.files} x --samples-per-file {args.samples_per_file} need {gb(need)} in "
                              f"--out {args.out}, and its disk has {gb(free)} free")


def available_memory():
    """Bytes of memory available now (Linux), or None where the system does not say."""
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def generate_file(args, i, device, progress):
    """(data, model) arrays of file i, drawn from the random stream [seed, i]."""
    rng = np.random.default_rng([args.seed, i])
    vel = FAMILIES[args.family](rng, args.samples_per_file)
    data = np.empty((len(vel), *DATA_SHAPE), dtype=np.float32)
    for s in range(0, len(vel), args.batch_size):
        v = torch.from_numpy(vel[s:s + args.batch_size]).to(device)
        data[s:s + len(v)] = simulate(v, pml_width=args.pml_width).cpu().numpy()
        progress(len(v))
    return data, vel[:, None]


def make_files(args, todo, device, progress):
    """Simulate the files numbered in TODO, each written (fsync, rename) on a background thread while the
    next one is simulated: a file of 100 samples is 140 MB. One write in flight, so memory holds two
    files at most; a failed write raises here, at the next file. Leaving early, by an error or Ctrl-C,
    first finishes the write under way, so every file is whole or absent."""
    def write(i, data, model):
        data_path, model_path = pair_paths(args.out, i)
        save_npy_atomic(model_path, model)
        save_npy_atomic(data_path, data)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="npy-writer") as writer:
        pending = None
        for i in todo:
            data, model = generate_file(args, i, device, progress)
            if pending is not None:
                pending.result()
            pending = writer.submit(write, i, data, model)
        if pending is not None:
            pending.result()


SETTINGS = ("family", "seed", "samples_per_file", "pml_width")  # what decides the content of file i


def settings_of(args):
    return {k: getattr(args, k) for k in SETTINGS}


def check_existing(args):
    """Resume only our own files made with the same settings; never replace anyone else's data: .npy files,
    split lists or a dataset.json in --out that no simulate.json of ours accounts for stop the run, and so do
    .npy files beside them (OpenFWI's fault families keep seis*.npy and vel*.npy there, which our data/ and
    model/ would hide from the trainer's --data-root), as does a training run's or an evaluation's folder."""
    listed = sorted(os.listdir(args.out)) if os.path.isdir(args.out) else []
    runs = [n for n in listed if n.endswith(".pt") or n in ("args.json", "train.log", "metrics.json")]
    if runs:
        raise SimulationError(f"--out {args.out} holds {', '.join(runs)}: a training run or evaluation results, not a "
                              f"dataset; choose another --out")
    beside = [n for n in listed if n.endswith(".npy")]
    if beside:
        raise SimulationError(f"--out {args.out} already holds {beside[0]}{' and more .npy files' if beside[1:] else ''}, "
                              f"which simulate_openfwi.py does not write (a dataset in OpenFWI's layout?); choose "
                              f"another --out")
    ours = settings_of(args)
    npys = [n for sub in ("data", "model") if os.path.isdir(os.path.join(args.out, sub))
            for n in os.listdir(os.path.join(args.out, sub)) if n.endswith(".npy")]
    others = [n for n in ("train.txt", "val.txt", "dataset.json") if os.path.exists(os.path.join(args.out, n))]
    recorded, foreign = None, []
    for name in ("simulate.json", "dataset.json"):  # dataset.json: sets made before simulate.json existed
        if not os.path.exists(os.path.join(args.out, name)):
            continue
        try:
            with open(os.path.join(args.out, name)) as fh:
                meta = json.load(fh)
            recorded = {k: meta[k] for k in SETTINGS}
            break
        except OSError as e:
            foreign.append(f"its {name} cannot be read: {e.strerror}")
        except (ValueError, RecursionError, KeyError, TypeError):  # RecursionError: nesting beyond the parser's
            foreign.append(f"its {name} is not one simulate_openfwi.py wrote")
    if (npys or others) and recorded is None:
        what = ".npy files" if npys else ", ".join(others)
        why = foreign[0] if foreign else "no simulate.json"
        raise SimulationError(f"--out {args.out} already holds {what} that simulate_openfwi.py did not make "
                              f"({why}); choose another --out")
    if npys and recorded != ours:
        diff = ", ".join(f"--{k.replace('_', '-')} {recorded[k]}" for k in SETTINGS if recorded[k] != ours[k])
        raise SimulationError(f"--out {args.out} holds data made with {diff}; re-run with those settings to resume "
                              f"it, or choose another --out")


@contextlib.contextmanager
def lock_out(out):
    """Hold OUT/.lock (an advisory flock, which the system drops however the process ends) while simulating
    into OUT: a second simulator started there (a second `bash run.sh`) would take the first one's files in
    flight for a killed run's leftovers and remove them. A file system without flock runs unguarded."""
    try:
        os.makedirs(out, exist_ok=True)
        fh = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise SimulationError(f"cannot write into --out {out}: {e.filename}: {e.strerror}") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fh.truncate(0)
            fh.write(f"{os.path.basename(sys.argv[0])} PID {os.getpid()} on {platform.node()}\n")
            fh.flush()
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                fh.seek(0)
                raise SimulationError(f"--out {out} is in use by another process ({fh.read().strip() or 'unnamed'}, "
                                      f"which holds {fh.name}); wait for it to end, or choose another --out") from None
        yield


def prepare_out(args):
    """Make OUT/data and OUT/model, remove the partial writes of a run killed mid-write, and record the
    settings in OUT/simulate.json before the first file is written."""
    try:
        for sub in ("data", "model"):
            d = os.path.join(args.out, sub)
            os.makedirs(d, exist_ok=True)
            for name in os.listdir(d):
                if ".npy.tmp-" in name:
                    os.remove(os.path.join(d, name))
        write_text_atomic(os.path.join(args.out, "simulate.json"), json.dumps(settings_of(args), indent=2) + "\n")
    except OSError as e:
        raise SimulationError(f"cannot write into --out {args.out}: {e.filename}: {e.strerror}") from None


def say(text):
    """Print a line of progress. A reader that went (`| head`) ends the lines, not the run: stdout then points
    at /dev/null, so neither the next line nor the flush at exit fails on the pipe."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, sys.stdout.fileno())
        os.close(quiet)


def read_text(path):
    """The text of PATH, or None where it cannot be read (absent, say)."""
    try:
        with open(path) as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError):
        return None


def write_metadata(args):
    """Split lists (paths relative to OUT, so the set can move as a whole) and dataset.json (min/max of the
    data actually written, over every file)."""
    out = os.path.abspath(args.out)
    pairs = [pair_paths(out, i) for i in range(1, args.files + 1)]
    n_val = args.val_files
    train, val = pairs[:len(pairs) - n_val], pairs[len(pairs) - n_val:]
    texts = {name: "".join(f"{os.path.relpath(d, out)}\t{os.path.relpath(m, out)}\n" for d, m in split)
             for name, split in (("train.txt", train), ("val.txt", val))}
    before = {name: read_text(os.path.join(out, name)) for name in texts}
    for name, text in texts.items():
        write_text_atomic(os.path.join(out, name), text)
    if None not in before.values() and before != texts:  # another --files or --val-files: a run trained on the old lists
        now, was = (" / ".join(str(d[n].count("\n")) for n in texts) for d in (texts, before))
        say(f"simulate_openfwi: note: train.txt / val.txt now list {now} files (they listed {was}): a run "
            f"trained on the old split resumes only on it")
    lo, hi = math.inf, -math.inf
    for d, _ in pairs:
        arr = np.load(d, mmap_mode="r")
        lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
    meta = {
        "family": args.family, "data_min": lo, "data_max": hi,
        "label_min": LABEL_MIN, "label_max": LABEL_MAX,
        "dx": DX, "dt": DT, "nt": NT, "f": FREQ, "n_grid": N_GRID, "ns": len(SRC_COLS), "ng": N_GRID,
        "src_cols": list(SRC_COLS), "src_row": SRC_ROW, "rec_row": REC_ROW, "pml_width": args.pml_width,
        "files": args.files, "samples_per_file": args.samples_per_file, "val_files": n_val, "seed": args.seed,
    }
    write_text_atomic(os.path.join(out, "dataset.json"), json.dumps(meta, indent=2) + "\n")


def default_batch(device):
    """Velocity models simulated together: measured best on each device (see --batch-size)."""
    return 256 if device.type == "cuda" else 16


def main(args):
    check_args(args)
    device = resolve_device(args.device)
    if args.batch_size is None:
        args.batch_size = default_batch(device)
    from tqdm import tqdm
    n, N = args.files, args.samples_per_file
    check_existing(args)  # before anything in --out is touched
    check_capacity(args)
    with lock_out(args.out):
        prepare_out(args)
        todo = [i for i in range(1, n + 1)
                if not (npy_complete(pair_paths(args.out, i)[0], (N, *DATA_SHAPE))
                        and npy_complete(pair_paths(args.out, i)[1], (N, *MODEL_SHAPE)))]
        say(f"simulate_openfwi: {args.family}, {n} files x {N} samples into {args.out} on {device}; "
            f"{n - len(todo)} complete, {len(todo)} to make")
        t0 = time.time()
        # disable=None: no bar where stderr is not a terminal (a log file would get every redraw)
        with tqdm(total=len(todo) * N, unit="sample", disable=None if args.progress and todo else True, dynamic_ncols=True) as bar:
            make_files(args, todo, device, bar.update)  # a stop closes the bar first, so its line ends before the stop's
        if todo:
            rate = len(todo) * N / max(time.time() - t0, 1e-9)
            say(f"simulate_openfwi: made {len(todo) * N} samples at {rate:.2f} samples/s")
        write_metadata(args)
    return 0


class Terminated(BaseException):
    """SIGTERM (a scheduler, `timeout`), raised on the main thread as Ctrl-C is, so a write under way completes;
    a BaseException, as KeyboardInterrupt is, so no `except Exception` (the kernel build's) takes it for a failure."""
    received = False  # set by the handler: whether this run's cli() has had one


def raise_terminated(signum, frame):
    # noted as well as raised: raised inside a finalizer (an object's __del__), the exception is
    # printed and ignored by Python, and the run would go on to exit 0
    Terminated.received = True
    raise Terminated


def cli(argv=None):
    main_thread = threading.current_thread() is threading.main_thread()  # where alone signal handlers can be set
    Terminated.received = False
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        args = get_args_parser().parse_args(argv)
        code = main(args)
        if Terminated.received:  # (its raise was lost in a finalizer)
            raise Terminated
        return code
    except SimulationError as e:
        print(f"simulate_openfwi.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"simulate_openfwi.py: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)  # numpy's short write has no strerror
        return 2
    except RuntimeError as e:  # CUDA's torch.OutOfMemoryError, or the CPU allocator's refusal
        if not ("out of memory" in str(e) or "can't allocate memory" in str(e)):
            raise
        print(f"simulate_openfwi.py: error: out of memory simulating --batch-size {args.batch_size} velocity models "
              f"at once; lower --batch-size", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        print(f"simulate_openfwi.py: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; complete files "
              f"are kept, re-run to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)  # None: a handler not set from Python


if __name__ == "__main__":
    if SIGINT_AT_START is signal.default_int_handler:  # the imports are done: cli() reports a Ctrl-C
        signal.signal(signal.SIGINT, SIGINT_AT_START)
    sys.exit(cli())

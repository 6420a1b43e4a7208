// CPU kernel of simulate_openfwi.py: the scheme of simulate()'s PyTorch loop (same stencils, same C-PML
// recursion on the same strips, same order of operations), one wavefield at a time.
//
// Why a kernel: on a CPU the PyTorch loop makes ~60 passes over memory and pays ~60 op dispatches per
// time step, and the weak fields ahead of the wavefront become subnormal floats (up to a fifth of the
// cells between steps 50 and 250), which the FPU processes about 100 times slower. Here one time step is
// one sweep over a wavefield small enough to stay in L2 cache (about 150 KB for 70 x 70 + PML), with
// flush-to-zero set, and the wavefields (models x shots) are independent, so threads share them out and
// never wait for each other during the time loop.
//
// Built on first use by simulate_openfwi.cpu_kernel() through torch.utils.cpp_extension. It includes no
// torch header (tensors arrive as data pointers, made on the Python side), so it compiles in about 10 s.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define FD_X86 1
#endif

namespace {

// fourth-order second and first differences, as C0..D2 in simulate_openfwi.py
constexpr float C0 = -5.0f / 2.0f, C1 = 4.0f / 3.0f, C2 = -1.0f / 12.0f;
constexpr float D1 = 2.0f / 3.0f, D2 = -1.0f / 12.0f;

struct Problem {
  int64_t B, S, H, W, sw, nt, nx, pml, src_row, rec_row;
  const float* v2;       // (B, H, W): (v dt / dx)^2 on the padded grid
  const float* coef[4];  // ax, bx, az, bz: C-PML coefficients on the strips, (2, sw) each (first, last)
  const float* wavelet;  // (nt,): Ricker wavelet times dx^2
  const int64_t* src_cols;  // (S,)
  float* out;               // (B, S, nt, nx)
};

// Scratch of one wavefield: u and u_old with a 2-cell zero halo (pitch W + 4); psi with a 2-cell zero
// halo along its axis and zeta on the two strips of each axis, as psi_x, zeta_x, psi_z, zeta_z there.
struct Fields {
  int64_t H, W, P, sw, sp;
  std::vector<float> buf;
  float *u, *u_old, *psi_x, *zeta_x, *psi_z, *zeta_z;

  Fields(int64_t H_, int64_t W_, int64_t sw_) : H(H_), W(W_), P(W_ + 4), sw(sw_), sp(sw_ + 4) {
    const int64_t n_u = (H + 4) * P;
    buf.assign(2 * n_u + 2 * H * sp + 2 * H * sw + 2 * sp * W + 2 * sw * W, 0.0f);
    u = buf.data();
    u_old = u + n_u;
    psi_x = u_old + n_u;       // (2, H, sw + 4)
    zeta_x = psi_x + 2 * H * sp;  // (2, H, sw)
    psi_z = zeta_x + 2 * H * sw;  // (2, sw + 4, W)
    zeta_z = psi_z + 2 * sp * W;  // (2, sw, W)
  }
  void reset() {
    std::fill(buf.begin(), buf.end(), 0.0f);
    u = buf.data();
    u_old = u + (H + 4) * P;
  }
};

// psi <- b psi + a du/dx on the strips of both axes. First, because the sweep reads psi's neighbours.
void update_psi(Fields& f, const Problem& p) {
  const int64_t H = f.H, W = f.W, P = f.P, sw = f.sw, sp = f.sp;
  for (int64_t side = 0; side < 2; ++side) {
    const float *a = p.coef[0] + side * sw, *b = p.coef[1] + side * sw;
    for (int64_t z = 0; z < H; ++z) {
      const float* u = f.u + (z + 2) * P + 2 + (side ? W - sw : 0);
      float* psi = f.psi_x + (side * H + z) * sp + 2;
#pragma omp simd
      for (int64_t i = 0; i < sw; ++i)
        psi[i] = psi[i] * b[i] + a[i] * ((u[i + 1] - u[i - 1]) * D1 + D2 * (u[i + 2] - u[i - 2]));
    }
    for (int64_t i = 0; i < sw; ++i) {
      const float a = p.coef[2][side * sw + i], b = p.coef[3][side * sw + i];
      const float* u = f.u + ((side ? H - sw : 0) + i + 2) * P + 2;
      float* psi = f.psi_z + (side * sp + i + 2) * W;
#pragma omp simd
      for (int64_t x = 0; x < W; ++x)
        psi[x] = psi[x] * b + a * ((u[x + P] - u[x - P]) * D1 + D2 * (u[x + 2 * P] - u[x - 2 * P]));
    }
  }
}

// Pointers of one row z for the sweep; the C-PML ones are set only on the strips.
struct Row {
  const float* u;  // u[x] = u(z, x); rows above and below at -+P
  float* next;     // u_old(z, x), overwritten with u(t + dt)
  const float* v2;
  int64_t P, W;
  const float *psi_x, *ax, *bx;  // indexed by x on the x strip being swept
  float* zeta_x;
  const float* psi_z;  // psi_z(z, x); rows above and below at -+W
  float* zeta_z;
  float az, bz;
};

// One stretch [xb, xe) of a row: Laplacian, the C-PML terms of the axes whose strip it lies on
// (lap += d(psi)/dx + zeta), then u(t + dt) = 2 u - u(t - dt) + v2 lap.
template <bool XPML, bool ZPML>
void sweep(const Row& r, int64_t xb, int64_t xe) {
  const float* __restrict u = r.u;
  float* __restrict next = r.next;
  const int64_t P = r.P, W = r.W;
#pragma omp simd
  for (int64_t x = xb; x < xe; ++x) {
    const float c = u[x];
    float lap = (((u[x - 1] + u[x + 1]) + u[x - P]) + u[x + P]) * C1;
    lap = lap + C2 * (((u[x - 2] + u[x + 2]) + u[x - 2 * P]) + u[x + 2 * P]);
    lap = lap + 2.0f * C0 * c;
    if (XPML) {
      const float* psi = r.psi_x;
      const float dpsi = (psi[x + 1] - psi[x - 1]) * D1 + D2 * (psi[x + 2] - psi[x - 2]);
      const float d2 = ((u[x + 1] + u[x - 1]) * C1 + C2 * (u[x + 2] + u[x - 2])) + C0 * c;
      const float zeta = r.zeta_x[x] * r.bx[x] + r.ax[x] * (d2 + dpsi);
      r.zeta_x[x] = zeta;
      lap = (lap + dpsi) + zeta;
    }
    if (ZPML) {
      const float* psi = r.psi_z;
      const float dpsi = (psi[x + W] - psi[x - W]) * D1 + D2 * (psi[x + 2 * W] - psi[x - 2 * W]);
      const float d2 = ((u[x + P] + u[x - P]) * C1 + C2 * (u[x + 2 * P] + u[x - 2 * P])) + C0 * c;
      const float zeta = r.zeta_z[x] * r.bz + r.az * (d2 + dpsi);
      r.zeta_z[x] = zeta;
      lap = (lap + dpsi) + zeta;
    }
    next[x] = (-next[x] + 2.0f * c) + r.v2[x] * lap;
  }
}

// Row z in three stretches: the first x strip, the middle, the last x strip.
void sweep_row(Fields& f, const Problem& p, const float* v2, int64_t z) {
  const int64_t H = f.H, W = f.W, sw = f.sw, sp = f.sp;
  Row r{f.u + (z + 2) * f.P + 2, f.u_old + (z + 2) * f.P + 2, v2 + z * W, f.P, W,
        nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0.0f, 0.0f};
  const bool on_z = z < sw || z >= H - sw;
  if (on_z) {
    const int64_t side = z < sw ? 0 : 1, i = side ? z - (H - sw) : z;
    r.psi_z = f.psi_z + (side * sp + i + 2) * W;
    r.zeta_z = f.zeta_z + (side * sw + i) * W;
    r.az = p.coef[2][side * sw + i];
    r.bz = p.coef[3][side * sw + i];
  }
  for (int64_t side = 0; side < 2; ++side) {
    const int64_t x0 = side ? W - sw : 0;  // shift the strip arrays so that they are indexed by x
    r.psi_x = f.psi_x + (side * H + z) * sp + 2 - x0;
    r.zeta_x = f.zeta_x + (side * H + z) * sw - x0;
    r.ax = p.coef[0] + side * sw - x0;
    r.bx = p.coef[1] + side * sw - x0;
    on_z ? sweep<true, true>(r, x0, x0 + sw) : sweep<true, false>(r, x0, x0 + sw);
  }
  on_z ? sweep<false, true>(r, sw, W - sw) : sweep<false, false>(r, sw, W - sw);
}

// All nt steps of wavefield i (model i / S, shot i % S); records row rec_row into out.
void run_wavefield(Fields& f, const Problem& p, int64_t i) {
  const int64_t P = f.P, pml = p.pml, col = p.src_cols[i % p.S];
  const float* v2 = p.v2 + (i / p.S) * p.H * p.W;
  const float src_scale = v2[(p.src_row + pml) * p.W + col + pml];
  const int64_t src_at = (p.src_row + pml + 2) * P + col + pml + 2;
  const int64_t rec_at = (p.rec_row + pml + 2) * P + pml + 2;
  float* out = p.out + i * p.nt * p.nx;
  f.reset();
  for (int64_t n = 0; n < p.nt; ++n) {
    update_psi(f, p);
    for (int64_t z = 0; z < p.H; ++z) sweep_row(f, p, v2, z);
    f.u_old[src_at] += src_scale * p.wavelet[n];
    std::swap(f.u, f.u_old);
    std::copy(f.u + rec_at, f.u + rec_at + p.nx, out + n * p.nx);
  }
}

}  // namespace

// Entry point. Pointers are the data of contiguous float32 / int64 CPU tensors made by simulate_openfwi._simulate_kernel.
void simulate(int64_t B, int64_t S, int64_t H, int64_t W, int64_t sw, int64_t nt, int64_t nx, int64_t pml,
              int64_t src_row, int64_t rec_row, uintptr_t v2, uintptr_t ax, uintptr_t bx, uintptr_t az, uintptr_t bz,
              uintptr_t wavelet, uintptr_t src_cols, uintptr_t out, int64_t threads) {
  auto f32 = [](uintptr_t a) { return reinterpret_cast<const float*>(a); };
  const Problem p{B, S, H, W, sw, nt, nx, pml, src_row, rec_row, f32(v2), {f32(ax), f32(bx), f32(az), f32(bz)},
                  f32(wavelet), reinterpret_cast<const int64_t*>(src_cols), reinterpret_cast<float*>(out)};
  std::atomic<int64_t> next_job{0};
  std::atomic<bool> failed{false};
  auto worker = [&]() {
#ifdef FD_X86
    struct FlushToZero {  // flush-to-zero and denormals-are-zero while this thread runs the kernel
      unsigned int saved = _mm_getcsr();
      FlushToZero() { _mm_setcsr(saved | 0x8040); }
      ~FlushToZero() { _mm_setcsr(saved); }
    } ftz;
#endif
    try {
      Fields f(H, W, sw);
      for (int64_t i = next_job++; i < B * S && !failed; i = next_job++) run_wavefield(f, p, i);
    } catch (const std::bad_alloc&) {
      failed = true;
    }
  };
  pybind11::gil_scoped_release no_gil;
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < std::min(threads, B * S); ++t) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error&) {  // no more threads to be had: the ones running share the work
      break;
    }
  }
  if (pool.empty()) worker();
  for (auto& t : pool) t.join();
  if (failed) throw std::runtime_error("simulate_openfwi kernel: out of memory");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("simulate", &simulate); }

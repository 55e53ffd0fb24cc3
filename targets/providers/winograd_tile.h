// Winograd F(4x4, 3x3) and F(2x2, 3x3) for NHWC float32 convolutions: stride 1, dilation 1, groups 1, any padding.
// Included once per instruction set and tile (by winograd.h, which winograd_builds.h includes per instruction set),
// inside namespaces and a GCC target region that define kW, the vector width in floats (16: AVX-512, 8: AVX2, 4: NEON or SSE2), and
// kM, the output tile's side (4 or 2); the glue picks one when a call site is made. WinoDims (the shapes and
// padding) is the glue's. oneDNN 2.x has F(4x4, 3x3) only from a batch of 4 up; at batch 1 its F(2x2, 3x3) saves
// 2.25x of the multiplies before its transforms and reorders into a blocked layout, F(4x4, 3x3) 4x.
//
// Each (kM+2)² input patch becomes V = Bᵀ d B, each filter U = G g Gᵀ (once, when the call site is made), the kP
// positions of a tile multiply as kP small matrix products over the channels, and Y = Aᵀ M A gives a kM x kM output
// tile. U is kP/9 times the weights (4x for F(4x4), 1.8x for F(2x2)): where reading it is the cost (256 channels and
// up at batch 1), the smaller tile wins. Tiles go in blocks that keep V and M in the core's L2; each OpenMP thread
// takes whole blocks.

typedef float vec __attribute__((vector_size(kW * 4)));
// Rows of the register tile (tiles), each two vectors of output channels wide: its 2 x kMR accumulators and operands
// within the registers. AVX-512 (32 registers) broadcasts each row's input from memory into its FMA; AVX2 and SSE
// have 16. NEON (32) takes each row's input into a register of its own for its by-element FMA: 12 rows spilled 4
// accumulators to the stack every channel (GCC 12), 8 rows keep all 16 in registers.
#if defined(__aarch64__)
constexpr int kMR = 8;
#else
constexpr int kMR = kW == 16 ? 12 : 6;
#endif
constexpr int kNR = 2 * kW;
constexpr int kA = kM + 2;   // the input patch's side
constexpr int kP = kA * kA;  // positions of a tile: 36 or 16

inline vec load(const float* p) {
  vec v;
  __builtin_memcpy(&v, p, sizeof(vec));
  return v;
}
inline void store(float* p, vec v) { __builtin_memcpy(p, &v, sizeof(vec)); }
inline vec splat(float x) { return x - vec{}; }  // a broadcast: x - 0 is x for every x (x + 0 is not, for -0)

struct Geometry : WinoDims {
  explicit Geometry(const WinoDims& d) : WinoDims(d) {}
  int64_t tiles_h() const { return (OH + kM - 1) / kM; }
  int64_t tiles_w() const { return (OW + kM - 1) / kM; }
  int64_t tiles() const { return N * tiles_h() * tiles_w(); }
  int64_t Cp() const { return (C + kW - 1) / kW * kW; }
  int64_t Kp() const { return (K + kNR - 1) / kNR * kNR; }
};

// U[kP][Kp/kNR][C][kNR] from OIHW weights w[K][C][3][3]; Kp: K rounded up to kNR, the padding zero.
inline void pack_weights(const WinoDims& d, const float* w, float* U) {
  const int64_t K = d.K, C = d.C, Kp = Geometry(d).Kp();
  static const double G4[6][3] = {{1. / 4, 0, 0},          {-1. / 6, -1. / 6, -1. / 6}, {-1. / 6, 1. / 6, -1. / 6},
                                  {1. / 24, 1. / 12, 1. / 6}, {1. / 24, -1. / 12, 1. / 6}, {0, 0, 1}};
  static const double G2[4][3] = {{1, 0, 0}, {.5, .5, .5}, {.5, -.5, .5}, {0, 0, 1}};
  const double(*G)[3] = kM == 4 ? G4 : G2;
  for (int64_t i = 0; i < kP * Kp * C; ++i) U[i] = 0.f;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) {
      const float* g = w + (k * C + c) * 9;
      double t[kA][3];
      for (int i = 0; i < kA; ++i)
        for (int j = 0; j < 3; ++j) t[i][j] = G[i][0] * g[0 * 3 + j] + G[i][1] * g[1 * 3 + j] + G[i][2] * g[2 * 3 + j];
      for (int i = 0; i < kA; ++i)
        for (int j = 0; j < kA; ++j) {
          double u = t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2];
          U[(((i * kA + j) * (Kp / kNR) + k / kNR) * C + c) * kNR + k % kNR] = static_cast<float>(u);
        }
    }
}

// Bᵀ d for one column (or row) of a patch: kA values in, kA out.
inline void input_rows(const vec* d, vec* s) {
  if constexpr (kM == 4) {
    s[0] = 4.f * d[0] - 5.f * d[2] + d[4];
    s[1] = -4.f * (d[1] + d[2]) + d[3] + d[4];
    s[2] = 4.f * (d[1] - d[2]) - d[3] + d[4];
    s[3] = 2.f * (d[3] - d[1]) - d[2] + d[4];
    s[4] = 2.f * (d[1] - d[3]) - d[2] + d[4];
    s[5] = 4.f * d[1] - 5.f * d[3] + d[5];
  } else {
    s[0] = d[0] - d[2];
    s[1] = d[1] + d[2];
    s[2] = d[2] - d[1];
    s[3] = d[1] - d[3];
  }
}

// Aᵀ m for one column (or row): kA values in, kM out.
inline void output_rows(const vec* m, vec* y) {
  if constexpr (kM == 4) {
    vec a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], e = m[3] - m[4];
    y[0] = m[0] + a + c;
    y[1] = b + 2.f * e;
    y[2] = a + 4.f * c;
    y[3] = b + 8.f * e + m[5];
  } else {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  }
}

// V[kP][TB][Cp] for tiles t0 .. t0+tb of the image batch.
inline void input_transform(const Geometry& g, const float* x, int64_t t0, int64_t tb, int64_t TB, float* V) {
  const int64_t th = g.tiles_h(), tw = g.tiles_w(), Cp = g.Cp();
  for (int64_t t = 0; t < tb; ++t) {
    int64_t id = t0 + t, n = id / (th * tw), r = id % (th * tw);
    int64_t y0 = r / tw * kM - g.pt, x0 = r % tw * kM - g.pl;
    for (int64_t c = 0; c < Cp; c += kW) {
      vec d[kA][kA];
      const bool whole = c + kW <= g.C;
      for (int i = 0; i < kA; ++i)
        for (int j = 0; j < kA; ++j) {
          int64_t yy = y0 + i, xx = x0 + j;
          if (yy < 0 || yy >= g.H || xx < 0 || xx >= g.W) {
            d[i][j] = vec{};
            continue;
          }
          const float* p = x + ((n * g.H + yy) * g.W + xx) * g.C + c;
          if (whole) {
            d[i][j] = load(p);
          } else {
            vec v{};
            for (int64_t q = 0; q < g.C - c; ++q) v[q] = p[q];
            d[i][j] = v;
          }
        }
      vec s[kA][kA];
      for (int j = 0; j < kA; ++j) {  // Bᵀ d, column by column
        vec col[kA], out[kA];
        for (int i = 0; i < kA; ++i) col[i] = d[i][j];
        input_rows(col, out);
        for (int i = 0; i < kA; ++i) s[i][j] = out[i];
      }
      const int64_t step = TB * Cp;
      for (int i = 0; i < kA; ++i) {  // (Bᵀ d) B, row by row
        vec out[kA];
        input_rows(s[i], out);
        float* o = V + ((i * kA) * TB + t) * Cp + c;
        for (int j = 0; j < kA; ++j) store(o + j * step, out[j]);
      }
    }
  }
}

// M[xi] (rows × kNR at column block kb) = V[xi] (rows × Cp) · U[xi][kb] (Cp × kNR), a register tile of R rows.
// The accumulators start from the first channel's products and every loop over them is unrolled, so that they
// live in registers: zero-filled arrays became a memset and a round trip through the stack, a fifth of a
// 64-channel product's time.
template <int R>
inline void micro(const float* v, int64_t ldv, const float* u, int64_t C, float* m, int64_t ldm) {
  vec acc0[R], acc1[R];
  {
    vec b0 = load(u), b1 = load(u + kW);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      vec a = splat(v[r * ldv]);
      acc0[r] = a * b0;
      acc1[r] = a * b1;
    }
  }
  for (int64_t c = 1; c < C; ++c) {
    vec b0 = load(u + c * kNR), b1 = load(u + c * kNR + kW);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      vec a = splat(v[r * ldv + c]);
      acc0[r] += a * b0;
      acc1[r] += a * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    store(m + r * ldm, acc0[r]);
    store(m + r * ldm + kW, acc1[r]);
  }
}

template <int R>
inline void rows_left(int64_t left, const float* v, int64_t ldv, const float* u, int64_t C, float* m, int64_t ldm) {
  if constexpr (R > 0) {
    if (left == R) return micro<R>(v, ldv, u, C, m, ldm);
    rows_left<R - 1>(left, v, ldv, u, C, m, ldm);
  }
}

// One of the kP x (Kp / kNR) products: position xi, output channels kb * kNR .. + kNR, for tb tiles.
inline void multiply_one(const Geometry& g, const float* V, const float* U, int64_t tb, int64_t TB, float* M, int xi, int64_t kb) {
  const int64_t Cp = g.Cp(), Kp = g.Kp(), kblocks = Kp / kNR;
  const float* v = V + xi * TB * Cp;
  float* m = M + xi * TB * Kp + kb * kNR;
  const float* u = U + (xi * kblocks + kb) * g.C * kNR;
  int64_t r = 0;
  for (; r + kMR <= tb; r += kMR) micro<kMR>(v + r * Cp, Cp, u, g.C, m + r * Kp, Kp);
  if (r < tb) rows_left<kMR - 1>(tb - r, v + r * Cp, Cp, u, g.C, m + r * Kp, Kp);
}

inline void multiply(const Geometry& g, const float* V, const float* U, int64_t tb, int64_t TB, float* M) {
  const int64_t kblocks = g.Kp() / kNR;
  for (int xi = 0; xi < kP; ++xi)
    for (int64_t kb = 0; kb < kblocks; ++kb) multiply_one(g, V, U, tb, TB, M, xi, kb);
}

typedef int32_t ivec __attribute__((vector_size(kW * 4)));

// e^x to about 2 ulp (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r, 2^n built in the exponent bits);
// 0 below -88 and e^88 above 88, which sigmoid and SiLU read as 0 and 1.
inline vec exp_approx(vec x) {
  x = x < -88.f ? splat(-88.f) : x;
  x = x > 88.f ? splat(88.f) : x;
  vec fx = x * 1.44269504088896341f + 0.5f;
  vec t = __builtin_convertvector(__builtin_convertvector(fx, ivec), vec);  // toward zero
  fx = t > fx ? t - 1.f : t;                                                 // floor
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  vec y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.f;
  ivec n = (__builtin_convertvector(fx, ivec) + 127) << 23;
  vec scale;
  __builtin_memcpy(&scale, &n, sizeof scale);
  return y * scale;
}

// Epilogue codes as onednn_glue.cc's Act (chains.py's ACT_*): none, relu, clip, sigmoid, SiLU (x · sigmoid(x)).
inline vec activate(vec y, int act, float lo, float hi) {
  if (act == 1) return y > 0.f ? y : vec{};
  if (act == 2) {
    y = y < lo ? splat(lo) : y;
    return y > hi ? splat(hi) : y;
  }
  if (act == 3) return 1.f / (1.f + exp_approx(-y));
  if (act == 5) return y / (1.f + exp_approx(-y));
  return y;
}

inline void output_transform(const Geometry& g, const float* M, int64_t t0, int64_t tb, int64_t TB, const float* bias,
                             const float* res, int act, float lo, float hi, float* out) {
  const int64_t th = g.tiles_h(), tw = g.tiles_w(), Kp = g.Kp();
  for (int64_t t = 0; t < tb; ++t) {
    int64_t id = t0 + t, n = id / (th * tw), r = id % (th * tw);
    int64_t oy0 = r / tw * kM, ox0 = r % tw * kM;
    for (int64_t k = 0; k < Kp && k < g.K; k += kW) {
      vec s[kM][kA];
      const float* mp = M + t * Kp + k;
      const int64_t step = TB * Kp;
      for (int j = 0; j < kA; ++j) {  // Aᵀ m, column by column
        vec col[kA], y[kM];
        for (int i = 0; i < kA; ++i) col[i] = load(mp + (i * kA + j) * step);
        output_rows(col, y);
        for (int i = 0; i < kM; ++i) s[i][j] = y[i];
      }
      vec bv{};
      const bool whole = k + kW <= g.K;
      if (bias) {
        if (whole) bv = load(bias + k);
        else for (int64_t q = 0; q < g.K - k; ++q) bv[q] = bias[k + q];
      }
      for (int i = 0; i < kM; ++i) {
        int64_t oy = oy0 + i;
        if (oy >= g.OH) break;
        vec y[kM];
        output_rows(s[i], y);  // (Aᵀ m) A, row by row
        for (int j = 0; j < kM; ++j) {
          int64_t ox = ox0 + j;
          if (ox >= g.OW) break;
          int64_t at = ((n * g.OH + oy) * g.OW + ox) * g.K + k;
          vec v = y[j] + bv;
          if (whole) {
            if (res) v += load(res + at);
            store(out + at, activate(v, act, lo, hi));
          } else {
            for (int64_t q = 0; q < g.K - k; ++q) {
              float f = v[q] + (res ? res[at + q] : 0.f);
              vec one = activate(splat(f), act, lo, hi);
              out[at + q] = one[0];
            }
          }
        }
      }
    }
  }
}

// Entry points (the glue sees these and pack_weights through the namespace): the packed weights' size, the scratch
// one block of TB tiles needs (V, then M), and one block: tiles t0 .. t0+tb transformed, multiplied and written to `out`.
inline int64_t packed_floats(const WinoDims& d) { return kP * Geometry(d).Kp() * d.C; }
inline int64_t scratch_floats(const WinoDims& d, int64_t TB) {
  Geometry g(d);
  return kP * TB * (g.Cp() + g.Kp());
}
inline int64_t products(const WinoDims& d) { return kP * (Geometry(d).Kp() / kNR); }
inline int64_t tiles(const WinoDims& d) { return Geometry(d).tiles(); }
inline void run_block(const WinoDims& d, const float* U, int64_t t0, int64_t tb, int64_t TB, float* scratch, const float* x,
                      const float* bias, const float* res, int act, float lo, float hi, float* out) {
  Geometry g(d);
  float* V = scratch;
  float* M = scratch + kP * TB * g.Cp();
  input_transform(g, x, t0, tb, TB, V);
  multiply(g, V, U, tb, TB, M);
  output_transform(g, M, t0, tb, TB, bias, res, act, lo, hi, out);
}

// The same in stages, for one block of all T tiles that threads share: tile t's input transform, product j of
// products(d), tile t's output transform. Each thread then reads only its products' share of the weights.
inline void stage_input(const WinoDims& d, const float* x, int64_t t, int64_t T, float* scratch) {
  Geometry g(d);
  input_transform(g, x, t, 1, T, scratch + t * g.Cp());
}
inline void stage_multiply(const WinoDims& d, const float* U, int64_t j, int64_t T, float* scratch) {
  Geometry g(d);
  const int64_t kblocks = g.Kp() / kNR;
  multiply_one(g, scratch, U, T, T, scratch + kP * T * g.Cp(), static_cast<int>(j / kblocks), j % kblocks);
}
inline void stage_output(const WinoDims& d, int64_t t, int64_t T, const float* scratch, const float* bias, const float* res, int act,
                         float lo, float hi, float* out) {
  Geometry g(d);
  output_transform(g, scratch + kP * T * g.Cp() + t * g.Kp(), t, 1, T, bias, res, act, lo, hi, out);
}

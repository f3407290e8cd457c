// Low-rank factorization cores: truncated SVD (exact and randomized), the Cholesky whitening
// of SVD-LLM, Tucker-2 (HOSVD + HOOI sweeps) and CP-ALS of convolution kernels.
//
// Every function takes float32 CPU views allocated by the caller; the arithmetic is done in
// float64 where it decides accuracy (Gram matrices, Cholesky, Tucker/CP) and in float32 or
// float64 for the SVD as asked. Inputs with NaN/Inf are a ValueError.
#pragma once

#include <cstdint>

#include "tensorslim/tensor_view.h"

namespace tensorslim {

// Thin SVD w = u diag(s) vt of w [m, n] with Eigen's divide-and-conquer SVD (BDCSVD).
// u [m, k], s [k] (descending), vt [k, n], k = min(m, n). double_precision computes in float64.
void svd_exact(const TensorView& w, bool double_precision, const TensorView& u,
               const TensorView& s, const TensorView& vt);

// Randomized SVD (Halko, Martinsson & Tropp 2011) of rank k = s.size(0): a Gaussian sketch of
// k + oversample columns, power_iters re-orthonormalized power iterations, then the exact SVD
// of the small projected matrix. Deterministic for a given seed. Same outputs as svd_exact
// truncated to k.
void svd_randomized(const TensorView& w, int64_t oversample, int power_iters, uint64_t seed,
                    const TensorView& u, const TensorView& s, const TensorView& vt);

// SVD-LLM's whitening (Wang et al. 2024): the lower Cholesky factor l [n, n] of
// g + damp * mean(diag g) * I (g = X^T X / N, [n, n]) and wl = w l ([m, n]). damp is raised x10
// until the factorization succeeds; returns the fraction used.
double whiten(const TensorView& w, const TensorView& g, double damp, const TensorView& wl,
              const TensorView& l);

// Undo the whitening on the right factor: out = vt l^-1 ([k, n]), a triangular solve.
void unwhiten(const TensorView& vt, const TensorView& l, const TensorView& out);

// Singular values of the mode-0 (output channel) and mode-1 (input channel) unfoldings of a
// conv kernel w [O, I, kh, kw]: s_out [O], s_in [I], descending.
void tucker2_spectra(const TensorView& w, const TensorView& s_out, const TensorView& s_in);

// Tucker-2 of w [O, I, kh, kw] with ranks (r_out, r_in) = (u_out.size(1), u_in.size(1)):
// HOSVD, then als_sweeps HOOI sweeps. w ~ core x0 u_out x1 u_in with u_out [O, r_out],
// u_in [I, r_in] orthonormal and core [r_out, r_in, kh, kw]. Returns the relative error
// ||w - reconstruction|| / ||w||.
double tucker2(const TensorView& w, int als_sweeps, const TensorView& u_out,
               const TensorView& u_in, const TensorView& core);

// CP decomposition (CANDECOMP/PARAFAC) of w [O, I, kh, kw] with rank R by alternating least
// squares: w[o,i,y,x] ~ sum_r a[o,r] b[i,r] c[y,r] d[x,r]; a [O, R], b [I, R], c [kh, R],
// d [kw, R]. Initialized from the leading singular vectors (random where R exceeds a mode's
// size, fixed seed). Returns the relative error.
double cp_als(const TensorView& w, int iters, uint64_t seed, const TensorView& a,
              const TensorView& b, const TensorView& c, const TensorView& d);

}  // namespace tensorslim

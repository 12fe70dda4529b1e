"""Deliberately naive reference implementation of one Multi-Token Attention layer.

Used ONLY by tests, as ground truth for the fast implementation. It is a literal,
scalar-loop transcription of /work/shared/docs/MTA.md ("One MTA attention layer, step by
step"), one sequence at a time, in float64. Nothing here is vectorized on purpose: every
formula of the spec appears below with the same index names (h, i, j, a, b, r, o, ...).

Conventions (from MTA.md):
  * positions are 0-based inside the one sequence given; out-of-range indices read 0;
  * Allowed(i, j) <=> j <= i;
  * kernels are cross-correlations (not flipped); conv row a = c_q-1 is the current query,
    column b = p_L is the same key;
  * pad_key: 'both' -> p_L = (c_k-1)/2 (c_k odd), 'left' -> p_L = c_k-1, 'right' -> p_L = 0;
  * mixing matrices are stored [out, in]; head_kernel is [H/c_h, c_h(in), c_h(out)].
"""

import math

import torch

DTYPE = torch.float64
NORM_EPS = 1e-5


# --------------------------------------------------------------------------------------
# small scalar helpers
# --------------------------------------------------------------------------------------

def _f64(x):
    return torch.as_tensor(x).detach().to(device="cpu", dtype=DTYPE).clone()


def _read(M, i, j, T):
    """M[i][j] for a T x T map given as nested lists; indices outside [0, T) read 0."""
    if i < 0 or i >= T or j < 0 or j >= T:
        return 0.0
    return M[i][j]


def _dot(x, y):
    """Dot product of two equal-length vectors (python lists or 1-d tensors)."""
    assert len(x) == len(y)
    s = 0.0
    for t in range(len(x)):
        s += float(x[t]) * float(y[t])
    return s


def _sigmoid(x):
    # numerically safe scalar logistic function
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _p_left(c_k, pad_key):
    if pad_key == "both":
        if c_k % 2 != 1:
            raise ValueError(f"pad_key='both' needs an odd c_k, got {c_k}")
        return (c_k - 1) // 2
    if pad_key == "left":
        return c_k - 1
    if pad_key == "right":
        return 0
    raise ValueError(f"unknown pad_key {pad_key!r}")


# --------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------

def naive_rope(x, theta):
    """x: [T, n, d] (positions 0..T-1 of ONE sequence). Interleaved-pair RoPE per MTA.md:
    pairs (x[2m], x[2m+1]) rotated by pos*theta**(-2m/d). Returns new tensor."""
    x = _f64(x)
    T, n, d = x.shape
    assert d % 2 == 0, "head dim must be even for RoPE"
    out = torch.zeros(T, n, d, dtype=DTYPE)
    for pos in range(T):
        for h in range(n):
            for m in range(d // 2):
                angle = pos * (float(theta) ** (-2.0 * m / d))
                c = math.cos(angle)
                s = math.sin(angle)
                x0 = float(x[pos, h, 2 * m])
                x1 = float(x[pos, h, 2 * m + 1])
                out[pos, h, 2 * m] = x0 * c - x1 * s
                out[pos, h, 2 * m + 1] = x0 * s + x1 * c
    return out


# --------------------------------------------------------------------------------------
# key-query convolution (steps 2 and 5), one head
# --------------------------------------------------------------------------------------

def _kq_conv(M, kernel, T, pad_key):
    """out[i][j] = sum_{a,b} kernel[a][b] * M[i - (c_q-1) + a][j - p_L + b], out-of-range = 0.

    M: T x T nested lists, kernel: c_q x c_k nested lists. Returns T x T nested lists,
    computed for every (i, j) (masking is the caller's business).
    """
    c_q = len(kernel)
    c_k = len(kernel[0])
    p_L = _p_left(c_k, pad_key)
    out = [[0.0] * T for _ in range(T)]
    for i in range(T):
        for j in range(T):
            acc = 0.0
            for a in range(c_q):
                for b in range(c_k):
                    acc += kernel[a][b] * _read(M, i - (c_q - 1) + a, j - p_L + b, T)
            out[i][j] = acc
    return out


# --------------------------------------------------------------------------------------
# MTA attention
# --------------------------------------------------------------------------------------

def naive_mta_attention(q, k, v, w, pad_key="both", layer_norm_rescale=False, layer_id=0):
    """One sequence. q: [T, H, d] (after RoPE), k, v: [T, G, d] with G dividing H (query head h
    uses kv head h // (H//G)).
    w: dict; every key optional (absent = that step is skipped):
      'mta_kernel'          [H, 1, c_q, c_k]    pre-softmax key-query conv (step 2)
      'wpsm'                [H, H]  [out, in]   pre-softmax head mixing (step 3)
      'mta_kernel_after_sm' [H, 1, c_q2, c_k2]  post-softmax key-query conv (step 5)
      'head_kernel'         [H/c_h, c_h, c_h]   grouped post-softmax head conv (step 6;
                                                dim1 = input head, dim2 = output head)
      'wposm'               [H, H]  [out, in]   post-softmax linear head mixing (step 6)
      'subln'               [d]                 group-norm RMSNorm weight (step 8), eps 1e-5; with
                                                layer_norm_rescale multiply by
                                                (1 - (0.8 - 0.6*exp(-0.3*layer_id)))
      'gate_weight' [1, d] or [d, d], 'gate_bias' [1] or [d]   gate (step 9):
            y <- y * sigmoid(gate_weight @ y + gate_bias) per (token, head), computed from that
            head's (normalized) output
    pad_key in {'both','left','right'} applies to both convs (p_L from each conv's own c_k).
    Returns O: [T, H, d] float64 (after norm and gate; before concatenation / wo)."""
    w = dict(w or {})
    known = {"mta_kernel", "wpsm", "mta_kernel_after_sm", "head_kernel", "wposm",
             "subln", "gate_weight", "gate_bias"}
    unknown = set(w) - known
    if unknown:
        raise KeyError(f"unknown weight keys {sorted(unknown)}")
    if "head_kernel" in w and "wposm" in w:
        raise ValueError("step 6 is ONE of head_kernel / wposm, not both")
    if "gate_bias" in w and "gate_weight" not in w:
        raise ValueError("gate_bias given without gate_weight")

    q = _f64(q)
    k = _f64(k)
    v = _f64(v)
    T, H, d = q.shape
    G = k.shape[1]
    assert k.shape == (T, G, d) and v.shape == (T, G, d), (q.shape, k.shape, v.shape)
    assert H % G == 0, "G must divide H"
    rep = H // G

    def kv_head(h):
        return h // rep

    # ---- step 0: raw scores S_h[i, j] = q_h,i . k_h,j / sqrt(d)
    S = [[[0.0] * T for _ in range(T)] for _ in range(H)]
    for h in range(H):
        for i in range(T):
            for j in range(T):
                S[h][i][j] = _dot(q[i, h], k[j, kv_head(h)]) / math.sqrt(d)

    # ---- step 1: zero the disallowed scores (j > i) before any convolution
    S_hat = [[[0.0] * T for _ in range(T)] for _ in range(H)]
    for h in range(H):
        for i in range(T):
            for j in range(T):
                S_hat[h][i][j] = S[h][i][j] if j <= i else 0.0

    # ---- step 2: pre-softmax key-query convolution (absent -> C = S_hat)
    if "mta_kernel" in w:
        ker = _f64(w["mta_kernel"])
        assert ker.dim() == 4 and ker.shape[0] == H and ker.shape[1] == 1, ker.shape
        C = [_kq_conv(S_hat[h], ker[h, 0].tolist(), T, pad_key) for h in range(H)]
    else:
        C = S_hat

    # ---- step 3: pre-softmax head mixing L_h = sum_h' Wpre[h, h'] C_h'  (absent -> L = C)
    if "wpsm" in w:
        Wpre = _f64(w["wpsm"])
        assert Wpre.shape == (H, H), Wpre.shape
        Wpre = Wpre.tolist()
        L = [[[0.0] * T for _ in range(T)] for _ in range(H)]
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    acc = 0.0
                    for hp in range(H):
                        acc += Wpre[h][hp] * C[hp][i][j]
                    L[h][i][j] = acc
    else:
        L = C

    # ---- step 4: mask (j > i -> -inf) and softmax over keys
    A = [[[0.0] * T for _ in range(T)] for _ in range(H)]
    for h in range(H):
        for i in range(T):
            m = -math.inf
            for j in range(T):
                if j <= i:
                    m = max(m, L[h][i][j])
            z = 0.0
            for j in range(T):
                if j <= i:
                    z += math.exp(L[h][i][j] - m)
            for j in range(T):
                A[h][i][j] = math.exp(L[h][i][j] - m) / z if j <= i else 0.0

    # ---- step 5: post-softmax key-query convolution, then zero j > i again (absent -> P = A)
    if "mta_kernel_after_sm" in w:
        ker2 = _f64(w["mta_kernel_after_sm"])
        assert ker2.dim() == 4 and ker2.shape[0] == H and ker2.shape[1] == 1, ker2.shape
        P = []
        for h in range(H):
            conv = _kq_conv(A[h], ker2[h, 0].tolist(), T, pad_key)
            P.append([[conv[i][j] if j <= i else 0.0 for j in range(T)] for i in range(T)])
    else:
        P = A

    # ---- step 6: post-softmax head mixing (head_kernel or wposm; absent -> P' = P)
    if "head_kernel" in w:
        hk = _f64(w["head_kernel"])
        assert hk.dim() == 3 and hk.shape[1] == hk.shape[2], hk.shape
        c_h = hk.shape[1]
        assert hk.shape[0] * c_h == H, (hk.shape, H)
        hk = hk.tolist()
        Pp = [[[0.0] * T for _ in range(T)] for _ in range(H)]
        for g in range(H // c_h):
            for o in range(c_h):
                for i in range(T):
                    for j in range(T):
                        acc = 0.0
                        for r in range(c_h):
                            acc += hk[g][r][o] * P[g * c_h + r][i][j]
                        Pp[g * c_h + o][i][j] = acc
    elif "wposm" in w:
        Wpost = _f64(w["wposm"])
        assert Wpost.shape == (H, H), Wpost.shape
        Wpost = Wpost.tolist()
        Pp = [[[0.0] * T for _ in range(T)] for _ in range(H)]
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    acc = 0.0
                    for hp in range(H):
                        acc += Wpost[h][hp] * P[hp][i][j]
                    Pp[h][i][j] = acc
    else:
        Pp = P

    # ---- step 7: O_h[i] = sum_j P'_h[i, j] v_h,j
    O = torch.zeros(T, H, d, dtype=DTYPE)
    vl = v.tolist()
    for h in range(H):
        for i in range(T):
            for e in range(d):
                acc = 0.0
                for j in range(T):
                    acc += Pp[h][i][j] * vl[j][kv_head(h)][e]
                O[i, h, e] = acc

    # ---- step 8: group norm: RMSNorm over d per (token, head), shared weight, optional rescale
    if "subln" in w:
        gw = _f64(w["subln"])
        assert gw.shape == (d,), gw.shape
        scale = 1.0
        if layer_norm_rescale:
            lam = 0.8 - 0.6 * math.exp(-0.3 * layer_id)
            scale = 1.0 - lam
        for i in range(T):
            for h in range(H):
                ms = 0.0
                for e in range(d):
                    ms += float(O[i, h, e]) ** 2
                ms /= d
                inv = 1.0 / math.sqrt(ms + NORM_EPS)
                y = [float(O[i, h, e]) for e in range(d)]
                for e in range(d):
                    O[i, h, e] = y[e] * inv * float(gw[e]) * scale

    # ---- step 9: gate y <- y * sigmoid(gate(y)), per (token, head), from the normalized y
    if "gate_weight" in w:
        Wg = _f64(w["gate_weight"])
        n_out = Wg.shape[0]
        assert Wg.shape in ((1, d), (d, d)), Wg.shape
        if "gate_bias" in w:
            bg = _f64(w["gate_bias"]).reshape(-1)
            assert bg.shape == (n_out,), bg.shape
        else:
            bg = torch.zeros(n_out, dtype=DTYPE)
        for i in range(T):
            for h in range(H):
                y = [float(O[i, h, e]) for e in range(d)]
                g = [_sigmoid(_dot(Wg[o], y) + float(bg[o])) for o in range(n_out)]
                for e in range(d):
                    O[i, h, e] = y[e] * (g[0] if n_out == 1 else g[e])

    return O


def naive_causal_attention(q, k, v):
    """Plain causal softmax attention (for identity-init checks): [T,H,d],[T,G,d],[T,G,d] -> [T,H,d]."""
    q = _f64(q)
    k = _f64(k)
    v = _f64(v)
    T, H, d = q.shape
    G = k.shape[1]
    assert H % G == 0
    rep = H // G
    O = torch.zeros(T, H, d, dtype=DTYPE)
    for h in range(H):
        kh = h // rep
        for i in range(T):
            s = [_dot(q[i, h], k[j, kh]) / math.sqrt(d) for j in range(i + 1)]
            m = max(s)
            p = [math.exp(x - m) for x in s]
            z = sum(p)
            for e in range(d):
                acc = 0.0
                for j in range(i + 1):
                    acc += p[j] / z * float(v[j, kh, e])
                O[i, h, e] = acc
    return O


def identity_weights(H, d, pre=None, post=None, wpsm=False, head_group=None, wposm=False):
    """Identity-initialized MTA weights per MTA.md (no norm / gate), float64.

    pre / post: (c_q, c_k) -> kernel [H, 1, c_q, c_k] with theta[c_q-1, c_k//2] = 1 (identity with
    pad_key='both', c_k odd). wpsm / wposm: True -> I_H. head_group: c_h -> head_kernel
    [H/c_h, c_h, c_h] = I per group. d is accepted for API symmetry (nothing d-sized is returned).
    """
    w = {}
    if pre is not None:
        c_q, c_k = pre
        ker = torch.zeros(H, 1, c_q, c_k, dtype=DTYPE)
        for h in range(H):
            ker[h, 0, c_q - 1, c_k // 2] = 1.0
        w["mta_kernel"] = ker
    if post is not None:
        c_q, c_k = post
        ker = torch.zeros(H, 1, c_q, c_k, dtype=DTYPE)
        for h in range(H):
            ker[h, 0, c_q - 1, c_k // 2] = 1.0
        w["mta_kernel_after_sm"] = ker
    if wpsm:
        w["wpsm"] = torch.eye(H, dtype=DTYPE)
    if head_group is not None:
        c_h = head_group
        assert H % c_h == 0
        hk = torch.zeros(H // c_h, c_h, c_h, dtype=DTYPE)
        for g in range(H // c_h):
            for r in range(c_h):
                hk[g, r, r] = 1.0
        w["head_kernel"] = hk
    if wposm:
        w["wposm"] = torch.eye(H, dtype=DTYPE)
    return w


# --------------------------------------------------------------------------------------
# self-check
# --------------------------------------------------------------------------------------

def _rand_case(gen, T, H, G, d):
    q = torch.randn(T, H, d, generator=gen, dtype=DTYPE)
    k = torch.randn(T, G, d, generator=gen, dtype=DTYPE)
    v = torch.randn(T, G, d, generator=gen, dtype=DTYPE)
    return q, k, v


def _full_random_weights(gen, H, d, pre=(3, 5), post=(2, 3), head="kernel", gate_1d=True):
    w = {
        "mta_kernel": 0.3 * torch.randn(H, 1, *pre, generator=gen, dtype=DTYPE),
        "wpsm": torch.eye(H, dtype=DTYPE) + 0.3 * torch.randn(H, H, generator=gen, dtype=DTYPE),
        "mta_kernel_after_sm": 0.5 * torch.randn(H, 1, *post, generator=gen, dtype=DTYPE),
        "subln": 1.0 + 0.2 * torch.randn(d, generator=gen, dtype=DTYPE),
    }
    if head == "kernel":
        w["head_kernel"] = torch.randn(1, H, H, generator=gen, dtype=DTYPE)
    elif head == "linear":
        w["wposm"] = torch.randn(H, H, generator=gen, dtype=DTYPE)
    n = 1 if gate_1d else d
    w["gate_weight"] = torch.randn(n, d, generator=gen, dtype=DTYPE)
    w["gate_bias"] = torch.randn(n, generator=gen, dtype=DTYPE)
    return w


def _maxdiff(a, b):
    return float((a - b).abs().max())


def _self_check():
    gen = torch.Generator().manual_seed(0)
    tol = 1e-12

    # 1. identity weights == plain causal attention (with and without GQA, with RoPE)
    for (T, H, G, d, pre, post, hg) in [(7, 4, 4, 8, (6, 11), (6, 11), 4),
                                        (9, 4, 2, 6, (2, 9), (3, 3), 2),
                                        (12, 2, 1, 4, (6, 11), (6, 11), 1)]:
        q, k, v = _rand_case(gen, T, H, G, d)
        q = naive_rope(q, 1e5)
        k = naive_rope(k, 1e5)
        ref = naive_causal_attention(q, k, v)
        for w in [identity_weights(H, d, pre=pre, post=post, wpsm=True, head_group=hg),
                  identity_weights(H, d, pre=pre, post=post, wpsm=True, wposm=True),
                  identity_weights(H, d, pre=pre),
                  identity_weights(H, d, post=post),
                  identity_weights(H, d, wpsm=True, head_group=hg),
                  {}]:
            out = naive_mta_attention(q, k, v, w, pad_key="both")
            assert _maxdiff(out, ref) < tol, ("identity", T, H, G, d, sorted(w), _maxdiff(out, ref))
    print("identity == causal attention: ok")

    # 2. hand-computed tiny case: T=3, H=1, d=1, q=k=1 (S = 1), v_j = j, pre kernel = ones(2, 3)
    #    C = [[1,.,.],[3,3,.],[4,5,3]]  -> O = [0, 0.5, (e^5 + 2e^3)/(e^4 + e^5 + e^3)]
    q = torch.ones(3, 1, 1, dtype=DTYPE)
    k = torch.ones(3, 1, 1, dtype=DTYPE)
    v = torch.tensor([0.0, 1.0, 2.0], dtype=DTYPE).reshape(3, 1, 1)
    out = naive_mta_attention(q, k, v, {"mta_kernel": torch.ones(1, 1, 2, 3, dtype=DTYPE)})
    e3, e4, e5 = math.exp(3), math.exp(4), math.exp(5)
    expect = torch.tensor([0.0, 0.5, (e5 + 2 * e3) / (e3 + e4 + e5)], dtype=DTYPE).reshape(3, 1, 1)
    assert _maxdiff(out, expect) < tol, (out.flatten(), expect.flatten())
    # same map with pad_key='left' (p_L = 2): C[i,j] = sum rows i-1..i, cols j-2..j
    #   C[1,0]=2, C[1,1]=3 ; C[2,0]=2, C[2,1]=4, C[2,2]=5
    out = naive_mta_attention(q, k, v, {"mta_kernel": torch.ones(1, 1, 2, 3, dtype=DTYPE)},
                              pad_key="left")
    e2 = math.exp(2)
    expect = torch.tensor([0.0, math.exp(3) / (e2 + e3),
                           (e4 + 2 * e5) / (e2 + e4 + e5)], dtype=DTYPE).reshape(3, 1, 1)
    assert _maxdiff(out, expect) < tol, (out.flatten(), expect.flatten())
    print("hand-computed conv cases: ok")

    # 3. random full-featured cases: finite, causal (future tokens never change past rows),
    #    GQA == explicitly repeated kv heads, head_kernel(one group) == wposm with transpose
    for (T, H, G, d, pad, pre, post) in [(8, 4, 2, 8, "both", (3, 5), (2, 3)),
                                         (10, 2, 2, 4, "left", (2, 4), (3, 2)),
                                         (6, 4, 1, 6, "right", (4, 3), (2, 5))]:
        q, k, v = _rand_case(gen, T, H, G, d)
        for gate_1d in (True, False):
            w = _full_random_weights(gen, H, d, pre=pre, post=post, gate_1d=gate_1d)
            out = naive_mta_attention(q, k, v, w, pad_key=pad, layer_norm_rescale=True, layer_id=5)
            assert out.shape == (T, H, d) and out.dtype == DTYPE
            assert torch.isfinite(out).all()
            # causality
            t = T // 2
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            q2[t + 1:] += 3.0
            k2[t + 1:] -= 2.0
            v2[t + 1:] *= -1.5
            out2 = naive_mta_attention(q2, k2, v2, w, pad_key=pad, layer_norm_rescale=True,
                                       layer_id=5)
            assert _maxdiff(out[:t + 1], out2[:t + 1]) < tol, "future leaked into the past"
            assert _maxdiff(out[t + 1:], out2[t + 1:]) > 1e-6
            # GQA mapping h -> h // (H//G)
            kr = k.repeat_interleave(H // G, dim=1)
            vr = v.repeat_interleave(H // G, dim=1)
            out3 = naive_mta_attention(q, kr, vr, w, pad_key=pad, layer_norm_rescale=True,
                                       layer_id=5)
            assert _maxdiff(out, out3) < tol
            # head_kernel[0, r, o] (in, out) == wposm[o, r] ([out, in])
            w4 = dict(w)
            hk = w4.pop("head_kernel")
            w4["wposm"] = hk[0].t().contiguous()
            out4 = naive_mta_attention(q, k, v, w4, pad_key=pad, layer_norm_rescale=True,
                                       layer_id=5)
            assert _maxdiff(out, out4) < tol
    print("random full cases (causality, GQA, head_kernel vs wposm): ok")

    # 4. query receptive field: perturbing q at t-(c_q-1)-(c_q'-1) changes row t; one further doesn't
    T, H, G, d = 12, 2, 2, 4
    q, k, v = _rand_case(gen, T, H, G, d)
    w = _full_random_weights(gen, H, d, pre=(4, 5), post=(3, 3), head="linear")
    base = naive_mta_attention(q, k, v, w)
    t = T - 1
    reach = (4 - 1) + (3 - 1)
    for s, should_change in [(t - reach, True), (t - reach - 1, False)]:
        q2 = q.clone()
        q2[s] += 1.0
        out = naive_mta_attention(q2, k, v, w)
        changed = _maxdiff(out[t], base[t]) > 1e-9
        assert changed == should_change, (s, changed)
    print("query receptive field (c_q-1)+(c_q'-1): ok")

    # 5. group norm + depth scaling + gate on top of plain attention, checked by hand formula
    T, H, G, d = 5, 2, 1, 4
    q, k, v = _rand_case(gen, T, H, G, d)
    gw = torch.randn(d, generator=gen, dtype=DTYPE)
    Wg = torch.randn(1, d, generator=gen, dtype=DTYPE)
    bg = torch.randn(1, generator=gen, dtype=DTYPE)
    base = naive_causal_attention(q, k, v)
    lam = 0.8 - 0.6 * math.exp(-0.3 * 3)
    y = base * torch.rsqrt(base.pow(2).mean(-1, keepdim=True) + 1e-5) * gw * (1 - lam)
    y = y * torch.sigmoid(y @ Wg.t() + bg)
    out = naive_mta_attention(q, k, v, {"subln": gw, "gate_weight": Wg, "gate_bias": bg},
                              layer_norm_rescale=True, layer_id=3)
    assert _maxdiff(out, y) < tol, _maxdiff(out, y)
    print("group norm / depth scaling / gate: ok")

    # 6. RoPE: position 0 unchanged, norms of pairs preserved, relative-position invariance of q.k
    x = torch.randn(6, 2, 8, generator=gen, dtype=DTYPE)
    xr = naive_rope(x, 1e4)
    assert _maxdiff(xr[0], x[0]) < tol
    assert _maxdiff(xr.reshape(6, 2, 4, 2).norm(dim=-1), x.reshape(6, 2, 4, 2).norm(dim=-1)) < tol
    a = torch.randn(1, 1, 8, generator=gen, dtype=DTYPE).expand(6, 1, 8)
    b = torch.randn(1, 1, 8, generator=gen, dtype=DTYPE).expand(6, 1, 8)
    ar, br = naive_rope(a, 1e4), naive_rope(b, 1e4)
    assert abs(float(ar[4, 0] @ br[2, 0]) - float(ar[3, 0] @ br[1, 0])) < 1e-12
    # pair m=1 at pos 1 is rotated by theta**(-2/d)
    e = torch.zeros(2, 1, 8, dtype=DTYPE)
    e[:, 0, 2] = 1.0
    er = naive_rope(e, 1e4)
    ang = 1e4 ** (-2.0 / 8)
    assert abs(float(er[1, 0, 2]) - math.cos(ang)) < tol and abs(float(er[1, 0, 3]) - math.sin(ang)) < tol
    print("RoPE: ok")

    print("naive_mta self-check passed")


if __name__ == "__main__":
    _self_check()

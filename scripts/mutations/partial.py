"""Deliberate bugs in the partial CPU kernels and the linear code shared with CUDA (scripts/mutate.py)."""
_CPU = "csrc/partial/partial_cpu.cpp"
_TESTS = "tests/test_partial.py"

MUTATIONS = [
    # Thread split of the row loops (only T * k > GRAIN_SIZE splits): a lost chunk offset.
    dict(name="gather_chunk_offset", file=_CPU, tests=_TESTS,
         find="scalar_t* __restrict__ o = out + t * k;",
         replace="scalar_t* __restrict__ o = out + (t - tb) * k;"),
    dict(name="scatter_chunk_offset", file=_CPU, tests=_TESTS,
         find="const scalar_t* __restrict__ s = src + t * k;",
         replace="const scalar_t* __restrict__ s = src + (t - tb) * k;"),
    # Range detection one step too lenient: an index one step short of a range takes the range path.
    dict(name="op_range_detect_lenient", file=_CPU, tests=_TESTS,
         find="return idx[k - 1] - idx[0] == k - 1 ? idx[0] : -1;",
         replace="return idx[k - 1] - idx[0] <= k ? idx[0] : -1;"),
    dict(name="kernel_range_detect_lenient", file=_CPU, tests=_TESTS,
         find="return k > 0 && p[k - 1] - p[0] == k - 1 ? p[0] : -1;",
         replace="return k > 0 && p[k - 1] - p[0] <= k ? p[0] : -1;"),
    # Scatter-add (index path) overwrites instead of adding.
    dict(name="scatter_overwrites", file=_CPU, tests=_TESTS,
         find="d = static_cast<scalar_t>(static_cast<acc_t>(d) + static_cast<acc_t>(s[j]));",
         replace="d = static_cast<scalar_t>(static_cast<acc_t>(s[j]));"),
    # Range path, dim 0 forward: the delta's product lands at column 0 instead of the range.
    dict(name="dim0_range_offset", file=_CPU, tests=_TESTS,
         find="else y2d.narrow(1, a, k).addmm_(x2d, d.t());",
         replace="else y2d.narrow(1, 0, k).addmm_(x2d, d.t());"),
    # Range path, dim 1 grad_x: the delta folded into W's block in W's dtype (rounds a small delta away).
    dict(name="dim1_grad_x_folds_delta", file=_CPU, tests=_TESTS,
         find="else if (a >= 0) gx.narrow(1, a, k).addmm_(g2d, d);",
         replace="else if (a >= 0) gx.narrow(1, a, k).copy_(at::mm(g2d, at::add(weight.narrow(1, a, k), delta)"
                 ".to(weight.scalar_type())));"),
    # General path, dim 0 backward: g[:, index] taken as the first k columns.
    dict(name="dim0_backward_gsel", file=_CPU, tests=_TESTS,
         find="g_sel = a >= 0 ? g2d.narrow(1, a, k) : kern.gather(g2d, index);",
         replace="g_sel = a >= 0 ? g2d.narrow(1, a, k) : g2d.narrow(1, 0, k);"),
    # Validation: duplicates accepted; an explicit range_start not checked against index.
    dict(name="duplicates_accepted", file=_CPU, tests=_TESTS,
         find="TORCH_CHECK(j == 0 || idx[j] > idx[j - 1]",
         replace="TORCH_CHECK(j == 0 || idx[j] >= idx[j - 1]"),
    dict(name="range_start_unchecked", file=_CPU, tests=_TESTS,
         find="if (a != range_start && index.numel() > 0) {",
         replace="if (false) {"),
]

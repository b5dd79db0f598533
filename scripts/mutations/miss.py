"""Deliberate bugs in the miss CPU kernels: the fold's span loop, ragged tail and class reduction, the unfold's
prefix copies, and the row ranges split across threads."""
_CPU = "csrc/miss/miss_cpu.cpp"
_TESTS = "tests/test_miss.py"

MUTATIONS = [
    dict(name="fold-tail-short-by-one", file=_CPU, tests=_TESTS,
         find="for (int64_t j = 0; j < tail; ++j) acc[j] += static_cast<acc_t>(s[j]);",
         replace="for (int64_t j = 0; j + 1 < tail; ++j) acc[j] += static_cast<acc_t>(s[j]);"),
    dict(name="fold-spans-not-accumulated", file=_CPU, tests=_TESTS,
         find="for (int64_t j = 0; j < L; ++j) acc[j] += static_cast<acc_t>(s[j]);",
         replace="for (int64_t j = 0; j < L; ++j) acc[j] = static_cast<acc_t>(s[j]);"),
    dict(name="fold-class-sum-short", file=_CPU, tests=_TESTS,
         find="for (int64_t j = c + r; j < L; j += r) v += acc[j];",
         replace="for (int64_t j = c + r; j + r < L; j += r) v += acc[j];"),
    dict(name="fold-row-range-offset-lost", file=_CPU, tests=_TESTS,
         find="const scalar_t* __restrict__ xr = x + t * n;", replace="const scalar_t* __restrict__ xr = x + (t - rb) * n;"),
    dict(name="unfold-row-range-offset-lost", file=_CPU, tests=_TESTS,
         find="const scalar_t* gr = g + t * r;", replace="const scalar_t* gr = g + (t - rb) * r;"),
    dict(name="unfold-span-copy-short", file=_CPU, tests=_TESTS,
         find="std::memcpy(o + f, o, std::min(head, n - f) * sizeof(scalar_t));",
         replace="std::memcpy(o + f, o, std::min(head, n - f - 1) * sizeof(scalar_t));"),
]

"""Profiling helper shared by the benchmarks."""


def kernel_table(prof, n, title, limit=20):
    """The GPU kernels of a profile (CUDA graph replays included), per call of what was profiled n
    times: calls and microseconds, the most expensive first, and the totals."""
    rows = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0 and getattr(e, "cpu_time_total", 0) == 0:   # a kernel, memcpy or memset
            c, t = rows.get(e.key, (0, 0.0))
            rows[e.key] = (c + e.count, t + us)
    total_n, total_us = sum(c for c, _ in rows.values()), sum(t for _, t in rows.values())
    print(f"\n### {title}: {total_n / n:.0f} kernels, {total_us / n:.0f} us of GPU time per call\n")
    print("| kernel | per call | us per call | share |\n|---|---:|---:|---:|")
    for k, (c, t) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:limit]:
        print(f"| {k[:90]} | {c / n:.1f} | {t / n:.1f} | {t / max(total_us, 1e-9):.1%} |")

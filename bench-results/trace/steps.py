#!/usr/bin/env python3
"""Where a pair's ITL tail comes from, from one traced `bench pd` run.

    RUST_LOG=warn,splitserve::step=trace splitserve bench pd --arms disaggregated ... \
        --out OUT 2> steps.log
    bench-results/trace/steps.py OUT steps.log

Reads the decode instance's step trace (steps without prompt tokens) and the client's token
arrivals (OUT/pd.json), and splits the tail into slow steps (CPU time above 1.2x the median:
the step itself ran slower), preempted steps (wall time over CPU time by more than 1 ms),
and late delivery (a token reaching the client more than 1 ms after its step ended).
Preempted steps that recur at a steady interval point at a periodic source.
"""
import bisect, datetime, json, re, statistics, sys

out, log = sys.argv[1], sys.argv[2]
steps = []  # (end in Unix µs, wall ms, cpu ms, decodes)
for line in open(log):
    if "splitserve::step" not in line:
        continue
    f = dict(re.findall(r"(\w+)=(\d+)", line))
    if f.get("prefill_tokens") != "0" or "cpu_us" not in f:
        continue
    try:
        at = datetime.datetime.strptime(line.split()[0][:26], "%Y-%m-%dT%H:%M:%S.%f")
    except ValueError:
        continue  # another process's output cut into this line
    at = at.replace(tzinfo=datetime.timezone.utc).timestamp() * 1e6
    steps.append((at, int(f["wall_us"]) / 1e3, int(f["cpu_us"]) / 1e3, int(f["decode_tokens"])))
steps.sort()
full = [s for s in steps if s[3] == max(x[3] for x in steps)]
q = lambda v, p: sorted(v)[int(len(v) * p)]
wall, cpu = [s[1] for s in full], [s[2] for s in full]
med = statistics.median(cpu)
print(f"{len(full)} steps of {full[0][3]} decodes: wall p50 {q(wall, .5):.2f} p99 {q(wall, .99):.2f} ms;"
      f" CPU p50 {med:.2f} p90 {q(cpu, .9):.2f} p99 {q(cpu, .99):.2f} max {max(cpu):.2f} ms")
slow = [s for s in full if s[2] > 1.2 * med]
pre = [s for s in full if s[1] - s[2] > 1.0]
print(f"slow steps (CPU > 1.2x median): {len(slow)} ({100 * len(slow) / len(full):.1f} %);"
      f" preempted > 1 ms: {len(pre)} ({100 * len(pre) / len(full):.1f} %)")
pre_all = [s for s in steps if s[1] - s[2] > 1.0]
if len(pre_all) >= 3:
    # A periodic source (this VM's kdamond samples every 500 ms) shows as a steady interval.
    iv = [(b[0] - a[0]) / 1e6 for a, b in zip(pre_all, pre_all[1:])]
    print(f"preempted decode steps (any batch): {len(pre_all)}, median"
          f" {statistics.median(x[1] - x[2] for x in pre_all):.1f} ms lost,"
          f" median {statistics.median(iv):.2f} s apart")

arm = json.load(open(f"{out}/pd.json"))["arms"][0]
ends = [s[0] for s in steps]
late, gaps = [], []
for s in arm["requests"]["streams"]:
    r = s["result"]
    t = arm["t0_unix_us"] + (r["start_s"] * 1e3 + r["ttft_ms"]) * 1e3
    for g in r["itl_ms"]:
        t += g * 1e3
        # Tokens leave just before the step's trace line is written: allow 1 ms.
        k = bisect.bisect_right(ends, t + 1e3) - 1
        if k >= 1:
            late.append((t - ends[k]) / 1e3)
            gaps.append((g, (ends[k] - ends[k - 1]) / 1e3))
print(f"delivery after the step: p50 {q(late, .5):.2f} p90 {q(late, .9):.2f} p99 {q(late, .99):.2f}"
      f" max {max(late):.2f} ms; over 1 ms: {100 * sum(x > 1 for x in late) / len(late):.1f} % of tokens")
p99 = q([g for g, _ in gaps], .99)
tail = [x for x in gaps if x[0] >= p99]
print(f"client gaps >= p99 ({p99:.2f} ms): {len(tail)}; median step interval behind them"
      f" {statistics.median(x[1] for x in tail):.2f} ms (behind all gaps: {statistics.median(x[1] for x in gaps):.2f})")

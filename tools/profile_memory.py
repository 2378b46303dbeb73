"""Where a run's memory goes: runs `onnxspfq ARGS...` in this process with a sampler thread beside it that reads
the resident set size every 50 ms together with the main thread's onnxspfq stack, then writes the peak RSS seen at
each stack (top 25) and a timeline of every 200 MB swing.

    python tools/profile_memory.py compress qwen2_0.6b.onnx --calib qwen2_0.6b_calib.npz -o q.onnx
    MEMPROF_OUT=prof.txt python tools/profile_memory.py ...      # default: memprof.txt

This is what located the Qwen2 0.6b peaks in docs/RESULTS.md section 6 (the agreement check's batch of logits,
the stacked c_alpha candidates on the lm_head, the float64 copy in the auto-task check). Linux only (/proc).
"""
import os
import sys
import threading
import time
import traceback

from onnxspfq.cli import main

peak: dict[str, tuple[float, float]] = {}
timeline: list[tuple[float, int, str]] = []
t0 = time.time()


def _sample() -> None:
    mt = threading.main_thread().ident
    while True:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        frame = sys._current_frames().get(mt)
        stack = traceback.extract_stack(frame) if frame else []
        key = ";".join(f"{os.path.basename(x.filename)}:{x.name}:{x.lineno}" for x in stack
                       if "onnxspfq" in x.filename)
        key = ";".join(key.split(";")[-4:])
        if rss > peak.get(key, (0.0, 0.0))[0]:
            peak[key] = (rss, time.time() - t0)
        if not timeline or abs(rss - timeline[-1][1]) > 200:
            timeline.append((round(time.time() - t0, 1), round(rss), key[-120:]))
        time.sleep(0.05)


if __name__ == "__main__":
    threading.Thread(target=_sample, daemon=True).start()
    try:
        rc = main(sys.argv[1:])
    finally:
        with open(os.environ.get("MEMPROF_OUT", "memprof.txt"), "w") as out:
            for key, (rss, t) in sorted(peak.items(), key=lambda kv: -kv[1][0])[:25]:
                out.write(f"{rss:.0f} MB t={t:.0f}s {key}\n")
            out.write("--- timeline\n")
            out.writelines(f"{row}\n" for row in timeline)
    sys.exit(rc)

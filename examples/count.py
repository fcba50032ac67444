"""Count to a number, checkpointing every step; kill it midway and it resumes.

    checker run examples/count.py --param steps=60
"""

import time

import checker

steps = int(checker.params().get("steps", 10))
total = 0
for step in range(1, steps + 1):
    total += step
    result = checker.checkpoint()
    note = " (restored)" if result.restored else ""
    print(f"step {step}: total {total}, checkpoint {result.number}{note}", flush=True)
    time.sleep(0.5)

checker.exit({"steps": steps, "total": total})

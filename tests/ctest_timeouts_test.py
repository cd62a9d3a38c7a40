#!/usr/bin/env python3
"""Every ctest test has a TIMEOUT property (issue 18, item 5): a test that hangs then fails after
its timeout instead of holding CI until the job's limit. Reads the tests back from
`ctest --show-only=json-v1` and fails naming each one without.

Usage: ctest_timeouts_test.py CTEST_COMMAND BUILD_DIR
"""
import json
import subprocess
import sys


def main() -> int:
    ctest, build_dir = sys.argv[1], sys.argv[2]
    out = subprocess.run([ctest, "--show-only=json-v1"], cwd=build_dir, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    tests = json.loads(out)["tests"]
    missing = []
    for test in tests:
        props = {p["name"]: p["value"] for p in test.get("properties", [])}
        timeout = props.get("TIMEOUT")
        if timeout is None or float(timeout) <= 0:
            missing.append(test["name"])
    if len(tests) < 50:
        print(f"FAIL: only {len(tests)} tests registered; is the build complete?")
        return 1
    if missing:
        print(f"FAIL: {len(missing)} of {len(tests)} tests have no TIMEOUT:")
        for name in missing:
            print(f"  {name}")
        return 1
    print(f"PASS: all {len(tests)} tests have a TIMEOUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())

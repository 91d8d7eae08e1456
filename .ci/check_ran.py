"""After the suite: fail CI if a test that needs PostgreSQL, the browser or the fuzzer was skipped,
or if none of them ran at all (a renamed file must not silently drop out of CI).

    python3 .ci/check_ran.py JUNIT_XML
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

# Each kind of test that CI must run, by the test module names that hold it.
REQUIRED = {
    "PostgreSQL": re.compile(
        r"(^|\.)test_(schema_postgres|store_outage|readme_psql|cluster\w*)(\.|:|$)"
        r"|\[postgres\]"
    ),
    "browser": re.compile(r"(^|\.)test_dashboard_browser(\.|:|$)"),
    "fuzzer": re.compile(r"(^|\.)test_(api_fuzz|hostile)(\.|:|$)"),
}


def main(path: str) -> int:
    ran = dict.fromkeys(REQUIRED, 0)
    skipped: list[str] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "") + "::" + (case.get("name") or "")
        for kind, pattern in REQUIRED.items():
            if not pattern.search(module):
                continue
            if case.find("skipped") is not None:
                skipped.append(f"{kind}: {module}::{case.get('name')}")
            else:
                ran[kind] += 1
    bad = False
    for kind, n in ran.items():
        print(f"CI: {n} {kind} test(s) ran")
        if n == 0:
            print(f"CI: no {kind} test ran at all", file=sys.stderr)
            bad = True
    for s in skipped:
        print(f"CI: skipped, but CI must run it: {s}", file=sys.stderr)
    return 1 if bad or skipped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

#!/usr/bin/env bash
# Installing an extra of ours must leave the user's torch alone and pin no old requests.
#
# For each pip requirement given (default: the project with its `eval`, `dev` and `docs`
# extras), pip resolves it against the packages installed in $PY's environment without
# installing anything (`pip install --dry-run --report`). The check fails when pip would
# install, replace or downgrade torch, torchvision or torchaudio, or install a requests older
# than the one installed (or, where none is installed, older than 2.32, the first without
# CVE-2024-35195).
#
# Usage: scripts/check_extras.sh                     # -e .[eval], -e .[dev] and -e .[docs]
#        scripts/check_extras.sh 'torchattacks==3.5.1'   # fails: torchvision, requests 2.25.1
#        PY=.venv/bin/python scripts/check_extras.sh
# Needs the package index pip is configured with (nothing is installed). Exit 0: all clean.
set -euo pipefail
PY=${PY:-python3}
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- '-e .[eval]' '-e .[dev]' '-e .[docs]'
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for req in "$@"; do
  # shellcheck disable=SC2086  # '-e .[eval]' is two arguments on purpose
  if ! "$PY" -m pip install --dry-run --quiet --disable-pip-version-check --no-input \
       --report "$tmp/report.json" $req >"$tmp/pip.log" 2>&1; then
    echo "check_extras: pip could not resolve '$req':" >&2
    grep -v "is ignored" "$tmp/pip.log" | tail -5 >&2
    status=1
    continue
  fi
  "$PY" - "$tmp/report.json" "$req" <<'PYEOF' || status=1
import json
import sys
from importlib import metadata

report, req = json.load(open(sys.argv[1])), sys.argv[2]
would = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def release(version):
    parts = []
    for p in version.split("+")[0].split("."):
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
        if digits != p:
            break
    return tuple(parts)


problems = []
for name in ("torch", "torchvision", "torchaudio"):
    if name in would:
        problems.append(f"it would install {name} {would[name]} (installed: {installed(name)})")
if "requests" in would:
    have = installed("requests")
    floor = have or "2.32.0"
    if release(would["requests"]) < release(floor):
        problems.append(f"it would install requests {would['requests']} (installed: {have}; "
                        f"versions before 2.32 have CVE-2024-35195)")
kept = ", ".join(f"{n} {installed(n)}" for n in ("torch", "requests") if installed(n))
if problems:
    print(f"check_extras: FAIL pip install {req}: " + "; ".join(problems))
    sys.exit(1)
new = ", ".join(f"{n} {v}" for n, v in sorted(would.items())) or "nothing"
print(f"check_extras: ok   pip install {req} keeps {kept or 'no torch, no requests'} "
      f"(would install: {new})")
PYEOF
done
exit $status

#!/usr/bin/env bash
# A screenshot of TensorBoard's Images tab for one run folder, taken in headless Chromium.
#
#     scripts/dashboard_screenshot.sh RUN_DIR OUT.png [WIDTHxHEIGHT]     # default 1400x1000
#
# Starts TensorBoard on RUN_DIR on a free port of 127.0.0.1, waits until it answers and lists the
# run's images (at most 60 s), opens http://127.0.0.1:PORT/#images in Debian's chromium (apt-get
# install chromium), gives the page's JavaScript 15 s of virtual time to load the images, saves the
# screenshot and stops TensorBoard. Uses the `tensorboard` next to `python3` (the one trainer's
# environment installs). Exit codes: 0 done, 1 TensorBoard or Chromium failed, 2 bad input.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 RUN_DIR OUT.png [WIDTHxHEIGHT]" >&2
    exit 2
fi
run_dir=$1
out=$(realpath -m -- "$2")
size=${3:-1400x1000}
if [ ! -d "$run_dir" ] || ! compgen -G "$run_dir/events.out.tfevents.*" >/dev/null; then
    echo "error: '$run_dir' is not a run folder with TensorBoard events (events.out.tfevents.*); give a trainer run folder" >&2
    exit 2
fi
if ! [[ $size =~ ^[0-9]+x[0-9]+$ ]]; then
    echo "error: window size '$size' is not WIDTHxHEIGHT, e.g. 1400x1000" >&2
    exit 2
fi
chromium=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$chromium" ]; then
    echo "error: chromium is not installed; install Debian's package: apt-get install chromium" >&2
    exit 2
fi
python=${PYTHON:-python3}

work=$(mktemp -d)
tensorboard_pid=
cleanup() {
    if [ -n "$tensorboard_pid" ]; then
        kill "$tensorboard_pid" 2>/dev/null || true
        wait "$tensorboard_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# --port 0: the system picks a free port, which TensorBoard prints in its first line; the run is
# named <name>/<timestamp> as under `tensorboard --logdir runs`
run_name="$(basename "$(dirname "$(realpath -- "$run_dir")")")/$(basename "$(realpath -- "$run_dir")")"
"$python" -m tensorboard.main --logdir_spec "$run_name:$(realpath -- "$run_dir")" --host 127.0.0.1 --port 0 --load_fast false \
    >"$work/tensorboard.log" 2>&1 &
tensorboard_pid=$!

# until it answers and its images plugin lists the run's images
if ! "$python" - "$work/tensorboard.log" "$tensorboard_pid" >/dev/null <<'EOF'; then
import json, os, re, sys, time, urllib.request

log, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
url = None
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("TensorBoard ended: " + open(log).read()[-2000:])
    if url is None:
        found = re.search(r"http://127\.0\.0\.1:\d+/", open(log).read())
        url = found.group(0) if found else None
    if url is not None:
        try:
            with urllib.request.urlopen(url + "data/plugin/images/tags", timeout=5) as answer:
                if any(json.load(answer).values()):
                    print(url)
                    sys.exit(0)
        except OSError:
            pass
    time.sleep(0.25)
sys.exit(f"TensorBoard showed no images within 60 s ({url or 'it did not start'}); its log:\n" + open(log).read()[-2000:])
EOF
    echo "error: TensorBoard did not serve the run's images" >&2
    exit 1
fi
url=$(grep -o -m1 'http://127\.0\.0\.1:[0-9]*/' "$work/tensorboard.log")

rm -f "$out"
timeout 120 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$work/profile" --window-size="${size/x/,}" --virtual-time-budget=15000 \
    --screenshot="$out" "${url}#images" >"$work/chromium.log" 2>&1 || true
if [ ! -s "$out" ]; then
    echo "error: Chromium wrote no screenshot; its log:" >&2
    tail -20 "$work/chromium.log" >&2
    exit 1
fi
echo "$out"

#!/usr/bin/env bash
# What `pip install delvm` puts on disk: a fresh virtual environment gets the CPU torch first (as
# the Makefile installs it), then the committed package (`git archive HEAD`), then each extra; the
# table gives site-packages after each step and what the step added. Run from the repository root:
#   bash benchmarks/install_size.sh
set -euo pipefail
TORCH="${TORCH:-torch==2.13.0}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
git archive HEAD | tar -x -C "$scratch" --one-top-level=delvm
python3 -m venv "$scratch/venv"
pip=("$scratch/venv/bin/python" -m pip install -q)
site="$("$scratch/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
mib() { du -s --block-size=1M "$@" | awk '{s += $1} END {print s}'; }

printf '%-34s %12s %10s\n' "step" "site-pkgs" "added"
last="$(mib "$site")"
row() {
    local now
    now="$(mib "$site")"
    printf '%-34s %8s MiB %6s MiB\n' "$1" "$now" "$((now - last))"
    last="$now"
}
row "fresh venv (pip, setuptools)"
"${pip[@]}" "$TORCH"
row "$TORCH"
"${pip[@]}" "$scratch/delvm"
row "delvm (core)"
printf '%-34s %8s MiB\n' "  site-packages without torch/" "$(($(mib "$site") - $(mib "$site/torch")))"
for extra in video tensorboard serve; do
    "${pip[@]}" "$scratch/delvm[$extra]"
    row "+ delvm[$extra]"
done

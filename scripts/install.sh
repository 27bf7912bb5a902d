#!/usr/bin/env bash
# The one install command of dsprune. `make install` (and so .ci/run) and both Dockerfiles call it,
# so the pinned install against constraints.txt is written down once.
#
#   scripts/install.sh [--torch-index URL] [--no-editable] VENV [EXTRAS]
#
#   VENV               the virtual environment to install into (created with $PYTHON, default python3)
#   EXTRAS             extras of dsprune, comma separated (`test` for development and CI)
#   --torch-index URL  take the pinned torch (the torch== line of constraints.txt) from this wheel index
#                      first, e.g. https://download.pytorch.org/whl/cpu so an image gets no CUDA, or
#                      .../whl/cu128 for the GPU image. Also $DSPRUNE_TORCH_INDEX. Without it torch comes
#                      from pip's configured sources like every other package.
#   --no-editable      install a copy of the package (images) instead of linking the checkout
set -euo pipefail

usage() { sed -n '4,13s/^# \{0,1\}//p' "$0" >&2; exit "${1:-2}"; }

torch_index="${DSPRUNE_TORCH_INDEX:-}"
editable=(-e)
while [ $# -gt 0 ]; do
    case "$1" in
        --torch-index) [ $# -ge 2 ] || usage; torch_index="$2"; shift 2 ;;
        --no-editable) editable=(); shift ;;
        -h|--help) usage 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] && [ $# -le 2 ] || usage
venv="$1"
extras="${2:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
constraints="$root/constraints.txt"

test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
if [ -n "$torch_index" ]; then
    # Only torch from the extra index; its dependencies then resolve against constraints.txt like
    # everything else. A bare `torch==V` matches the index's local builds (V+cpu, V+cu128).
    torch_pin="$(grep -E '^torch==' "$constraints")"
    "$py" -m pip install --quiet --no-deps --index-url "$torch_index" "$torch_pin"
fi
"$py" -m pip install --quiet -c "$constraints" "${editable[@]}" "$root${extras:+[$extras]}"

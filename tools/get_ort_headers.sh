#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (Debian's libonnxruntime-dev) into a cache folder,
# without installing anything system-wide. onnxruntime's pip wheels ship no headers.
#
# Usage: tools/get_ort_headers.sh [DEST]     (default: ~/.cache/scap-onnx/ort-headers)
# Prints the folder that holds include/onnxruntime/onnxruntime_c_api.h.
# On Debian 13 the package comes from the configured suites; on Debian 12 a temporary apt
# source list points the machine's own Debian mirror at the `trixie` suite.
set -euo pipefail

dest="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/scap-onnx/ort-headers}"
if [ -f "$dest/include/onnxruntime/onnxruntime_c_api.h" ]; then
  echo "$dest"; exit 0
fi
if [ -f /usr/include/onnxruntime/onnxruntime_c_api.h ]; then
  echo /usr; exit 0
fi
command -v apt-get >/dev/null || { echo "get_ort_headers: apt-get not found; pass -DONNXRUNTIME_ROOT=<onnxruntime release folder> to CMake instead" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The first Debian mirror configured on this machine (deb822 .sources or one-line .list files),
# skipping the security archive, which has no trixie main suite.
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
  | grep -v '^\s*#' | grep -oE '(https?|file)://[^ ]+' | grep -v -- '-security' | grep -i debian | head -n 1 || true)
[ -n "$mirror" ] || { echo "get_ort_headers: no Debian mirror found in /etc/apt" >&2; exit 2; }

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb [signed-by=$keyring] $mirror trixie main" > "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
          -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")
echo "get_ort_headers: fetching libonnxruntime-dev from $mirror (trixie)" >&2
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$work" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev >&2)
deb=$(ls "$work"/libonnxruntime-dev_*.deb)
dpkg -x "$deb" "$work/root"

mkdir -p "$dest/include"
rm -rf "$dest/include/onnxruntime"
cp -r "$work/root/usr/include/onnxruntime" "$dest/include/onnxruntime"
basename "$deb" > "$dest/SOURCE"
echo "$dest"

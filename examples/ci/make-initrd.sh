#!/bin/sh
# Builds a test initramfs for microvm from busybox-static, examples/ci/init and a test
# script:   make-initrd.sh TEST.sh OUT.cpio.gz
# Needs busybox-static, cpio and gzip (apt-get install busybox-static cpio).
set -eu
[ $# -eq 2 ] || { echo "usage: $0 TEST.sh OUT.cpio.gz" >&2; exit 2; }
test_sh=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "$0: $busybox missing: apt-get install busybox-static" >&2; exit 1; }
[ -r "$test_sh" ] || { echo "$0: cannot read $test_sh" >&2; exit 2; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/root"
cp "$busybox" "$root/bin/busybox"
for a in $("$busybox" --list); do
    [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
done
cp "$here/init" "$root/init"
cp "$test_sh" "$root/test.sh"
chmod 755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -n -6 >"$out.tmp"
mv "$out.tmp" "$out"

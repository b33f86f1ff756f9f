#!/bin/sh
# mkimage.sh — a Debian CVM image with systemd as PID 1 and cvm-warden.service (Type=notify)
# running the workload. Two steps, both as root, with no network but a Debian mirror:
#
#   mkimage.sh rootfs --out DIR [--packages FILE] [--suite bookworm] [--mirror URL]
#       debootstrap --variant=minbase with the packages of image/packages.txt, trimmed
#       (no docs, man pages, locales, .deb cache). Slow (minutes): cache it.
#
#   mkimage.sh image --rootfs DIR --out ROOT.ext4 --initrd INITRD.cpio.gz \
#       --warden BIN --policy FILE --units DIR \
#       [--bundle DIR --bundle-at PATH] [--user NAME:UID]... \
#       [--modules-root ROOT --kver KVER [--module NAME]...] \
#       [--unit FILE]... [--network FILE]... [--enable UNIT]... [--install SRC DST MODE]...
#       [--size MIB]
#       A copy of the root file system with cvm-warden at /usr/bin/cvm-warden, the policy at
#       /etc/cvm-warden/policy.toml, the bundle, units/cvm-warden.service (enabled) and every
#       drop-in of units/dropins, extra units (enabled), systemd-networkd .network files
#       (networkd enabled: in the systemd shape cvm-warden leaves the interfaces to the OS and
#       starts after network-online.target), the kernel modules the policy loads
#       (with their dependencies, indexed by depmod), packed as an ext4 image with
#       `mkfs.ext4 -d` (no mount); and a small initramfs (busybox) that loads virtio_blk and
#       ext4, mounts the root (cvm.root=, default /dev/vda) and switch_roots to systemd.
#
# Boot: the kernel (vmlinuz-KVER) with -initrd INITRD -append "console=ttyS0 cvm.root=/dev/vda"
# and ROOT.ext4 as a virtio disk. The VM harness (tests/vm, `cargo xtask vm-test systemd-…`)
# builds its systemd-shape images with this script; docs/build-a-flare-cvm-image.md is the
# walk-through for a site.
set -eu

die() {
    echo "mkimage.sh: error: $*" >&2
    exit 1
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 is missing: apt-get install $2"
}

here=$(cd "$(dirname "$0")" && pwd)

rootfs() {
    out=
    packages="$here/packages.txt"
    suite=bookworm
    mirror=http://deb.debian.org/debian
    while [ $# -gt 0 ]; do
        case "$1" in
        --out) out=$2; shift 2 ;;
        --packages) packages=$2; shift 2 ;;
        --suite) suite=$2; shift 2 ;;
        --mirror) mirror=$2; shift 2 ;;
        *) die "rootfs: unknown argument $1" ;;
        esac
    done
    [ -n "$out" ] || die "rootfs: --out DIR is required"
    [ "$(id -u)" = 0 ] || die "rootfs: debootstrap needs root"
    need debootstrap debootstrap
    include=$(grep -v '^[[:space:]]*#' "$packages" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
    [ -n "$include" ] || die "rootfs: $packages lists no package"
    partial="$out.partial"
    rm -rf "$partial"
    mkdir -p "$partial"
    if ! debootstrap --variant=minbase --include="$include" "$suite" "$partial" "$mirror" \
        >"$partial.log" 2>&1; then
        tail -n 20 "$partial.log" >&2
        die "rootfs: debootstrap $suite from $mirror failed (log: $partial.log): is the mirror reachable?"
    fi
    # Trim what a CVM never reads.
    rm -rf "$partial"/usr/share/doc/* "$partial"/usr/share/man/* "$partial"/usr/share/info/* \
        "$partial"/usr/share/locale/* "$partial"/var/cache/apt/archives/*.deb \
        "$partial"/var/lib/apt/lists/* "$partial"/var/log/*.log
    # Boots to multi-user.target; no first-boot questions on the console (systemd-firstboot
    # would prompt when /etc/machine-id is empty), one machine id made now.
    ln -sf /usr/lib/systemd/system/multi-user.target "$partial/etc/systemd/system/default.target"
    ln -sf /dev/null "$partial/etc/systemd/system/systemd-firstboot.service"
    rm -f "$partial/etc/machine-id"
    systemd-machine-id-setup --root="$partial" >/dev/null 2>&1 ||
        od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$partial/etc/machine-id"
    echo cvm >"$partial/etc/hostname"
    : >"$partial/etc/fstab"
    mv "$partial.log" "$partial/debootstrap.log"
    rm -rf "$out"
    mv "$partial" "$out"
    echo "mkimage.sh: root file system in $out ($(du -sm "$out" | cut -f1) MiB)"
}

# Copies the module files NAME needs (dependencies first) from ROOT's kernel tree into STAGE's
# /usr/lib/modules/KVER; prints their paths relative to that folder, in load order.
copy_modules() {
    mroot=$1 kver=$2 stage=$3 name=$4
    src="$mroot/lib/modules/$kver"
    dst="$stage/usr/lib/modules/$kver"
    modprobe -d "$mroot" -S "$kver" --show-depends "$name" >"$tmp/deps" 2>&1 ||
        die "kernel module $name is not in $src: $(cat "$tmp/deps")"
    sed -n 's/^insmod \([^ ]*\).*/\1/p' "$tmp/deps" >"$tmp/paths"
    while read -r path; do
        rel=${path#"$src"/}
        [ "$rel" != "$path" ] || die "module $path is outside $src"
        mkdir -p "$dst/$(dirname "$rel")"
        cp "$path" "$dst/$rel"
        echo "$rel"
    done <"$tmp/paths"
}

image() {
    root= out= initrd= warden= policy= units= bundle= bundle_at= mroot= kver= size=
    modules= extra_units= users= networks= enable=
    : >"$tmp/install"
    while [ $# -gt 0 ]; do
        case "$1" in
        --rootfs) root=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --initrd) initrd=$2; shift 2 ;;
        --warden) warden=$2; shift 2 ;;
        --policy) policy=$2; shift 2 ;;
        --units) units=$2; shift 2 ;;
        --bundle) bundle=$2; shift 2 ;;
        --bundle-at) bundle_at=$2; shift 2 ;;
        --modules-root) mroot=$2; shift 2 ;;
        --kver) kver=$2; shift 2 ;;
        --module) modules="$modules $2"; shift 2 ;;
        --unit) extra_units="$extra_units $2"; shift 2 ;;
        --user) users="$users $2"; shift 2 ;;
        --network) networks="$networks $2"; shift 2 ;;
        --enable) enable="$enable $2"; shift 2 ;;
        --install) printf '%s %s %s\n' "$2" "$3" "$4" >>"$tmp/install"; shift 4 ;;
        --size) size=$2; shift 2 ;;
        *) die "image: unknown argument $1" ;;
        esac
    done
    for v in root out initrd warden policy units mroot kver; do
        eval "[ -n \"\${$v}\" ]" || die "image: --$(echo $v | sed 's/mroot/modules-root/; s/root$/rootfs/') is required"
    done
    mroot=$(cd "$mroot" && pwd -P) || die "image: --modules-root $mroot is not a folder"
    [ -x "$root/sbin/init" ] || die "image: $root is not a root file system (no /sbin/init): run mkimage.sh rootfs"
    [ -f "$units/cvm-warden.service" ] || die "image: $units has no cvm-warden.service"
    if [ -n "$bundle" ] && [ -z "$bundle_at" ]; then die "image: --bundle needs --bundle-at"; fi
    need mkfs.ext4 e2fsprogs
    need cpio cpio
    need depmod kmod
    need systemctl systemd
    [ -x /bin/busybox ] || die "/bin/busybox is missing: apt-get install busybox-static"

    stage="$out.root"
    rm -rf "$stage"
    cp -a "$root" "$stage"
    rm -f "$stage/debootstrap.log"

    # cvm-warden, its policy, the bundle.
    install -m 0755 "$warden" "$stage/usr/bin/cvm-warden"
    install -d -m 0755 "$stage/etc/cvm-warden"
    install -m 0644 "$policy" "$stage/etc/cvm-warden/policy.toml"
    if [ -n "$bundle" ]; then
        mkdir -p "$stage$(dirname "$bundle_at")"
        cp -a "$bundle" "$stage$bundle_at"
        chown -R 0:0 "$stage$bundle_at"
    fi
    for user in $users; do
        name=${user%%:*} uid=${user#*:}
        chroot "$stage" groupadd --gid "$uid" "$name"
        chroot "$stage" useradd --uid "$uid" --gid "$uid" --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin "$name"
    done
    while read -r src dst mode; do
        install -D -m "$mode" "$src" "$stage$dst"
    done <"$tmp/install"

    # The units: cvm-warden.service enabled, every drop-in, the extra units enabled, the
    # network (systemd-networkd) when .network files are given.
    install -m 0644 "$units/cvm-warden.service" "$stage/usr/lib/systemd/system/cvm-warden.service"
    for dir in "$units"/dropins/*.d; do
        install -D -m 0644 "$dir/50-cvm-warden.conf" \
            "$stage/etc/systemd/system/$(basename "$dir")/50-cvm-warden.conf"
    done
    enable="cvm-warden.service $enable"
    for unit in $extra_units; do
        install -m 0644 "$unit" "$stage/etc/systemd/system/$(basename "$unit")"
        enable="$enable $(basename "$unit")"
    done
    for network in $networks; do
        install -D -m 0644 "$network" "$stage/etc/systemd/network/$(basename "$network")"
    done
    if [ -n "$networks" ]; then
        enable="$enable systemd-networkd.service systemd-networkd-wait-online.service"
    fi
    for unit in $enable; do
        systemctl --root="$stage" --quiet enable "$unit" ||
            die "image: systemctl --root=$stage enable $unit failed"
    done

    # Kernel modules: what the policy loads, with dependencies, indexed for cvm-warden.
    mdir="$stage/usr/lib/modules/$kver"
    mkdir -p "$mdir"
    for index in modules.builtin modules.builtin.modinfo modules.order; do
        [ -f "$mroot/lib/modules/$kver/$index" ] && cp "$mroot/lib/modules/$kver/$index" "$mdir/"
    done
    for m in $modules; do copy_modules "$mroot" "$kver" "$stage" "$m" >"$tmp/copied"; done
    depmod -b "$stage" "$kver"

    # The root file system image.
    if [ -z "$size" ]; then
        size=$(($(du -sm "$stage" | cut -f1) * 5 / 4 + 128))
    fi
    rm -f "$out"
    mkfs.ext4 -q -F -L cvm-root -d "$stage" "$out" "${size}M" ||
        die "mkfs.ext4 -d $stage $out failed"

    # The initramfs: busybox, virtio_blk and ext4 with dependencies, /init.
    ird="$out.initrd"
    rm -rf "$ird"
    mkdir -p "$ird/bin" "$ird/dev" "$ird/proc" "$ird/sys" "$ird/newroot"
    chmod 0755 "$ird"
    cp /bin/busybox "$ird/bin/busybox"
    : >"$tmp/initrd-modules"
    for m in virtio_pci virtio_blk crc32c_generic ext4; do
        copy_modules "$mroot" "$kver" "$ird" "$m" >>"$tmp/initrd-modules"
    done
    awk '!seen[$0]++' "$tmp/initrd-modules" >"$ird/modules.list"
    cat >"$ird/init" <<'EOF'
#!/bin/busybox sh
# cvm-warden image: load the disk and ext4 drivers, mount the root, hand over to systemd.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
kver=$(uname -r)
while read -r m; do
    insmod "/usr/lib/modules/$kver/$m" 2>/dev/null || grep -q "^$(basename "$m" .ko | tr - _) " /proc/modules ||
        echo "cvm-image: cannot load $m"
done </modules.list
root=$(sed -n 's/.*cvm\.root=\([^ ]*\).*/\1/p' /proc/cmdline)
root=${root:-/dev/vda}
tries=0
while [ ! -b "$root" ] && [ $tries -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "cvm-image: cannot mount the root file system $root: powering off"
    poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
EOF
    chmod 0755 "$ird/init"
    (cd "$ird" && find . -print0 | LC_ALL=C sort -z |
        cpio --quiet --null -o -H newc -R 0:0 --reproducible | gzip -1 -n) >"$initrd"
    rm -rf "$stage" "$ird"
    echo "mkimage.sh: $out (${size} MiB ext4), $initrd"
}

[ $# -ge 1 ] || die "usage: mkimage.sh rootfs|image …"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmd=$1
shift
case "$cmd" in
rootfs) rootfs "$@" ;;
image) image "$@" ;;
*) die "unknown command $cmd (rootfs or image)" ;;
esac

#!/bin/sh
# /init of the ninep test guest: load the 9p/virtio modules, make the mounts the job's
# /job/env asks for (MOUNT_n="kind source target options"), run /job/run.sh, print its output
# between markers on the serial console, power off. Never reboots, never waits for input.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root TZ=UTC
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /lib/modules/order); do
	insmod "/lib/modules/$m" || echo "init: insmod $m failed"
done
. /job/env

# The host names virtio-serial ports asynchronously after the driver binds: wait a little.
find_port() {
	i=0
	while [ $i -lt 100 ]; do
		for p in /sys/class/virtio-ports/*; do
			[ -f "$p/name" ] && [ "$(cat "$p/name")" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
		done
		sleep 0.1
		i=$((i + 1))
	done
	return 1
}

mount9p() {  # kind source target options
	mkdir -p "$3"
	case "$1" in
	virtio) mount -t 9p -o "$4" "$2" "$3" ;;
	fd)
		port=$(find_port "$2") || { echo "no virtio-serial port named $2"; return 1; }
		# relay PORT FDNO CMD...: socketpair, pump the port to one end, exec CMD with the other on FDNO
		relay "$port" 3 mount -t 9p -o "$4,rfdno=3,wfdno=3" "$2" "$3" ;;
	*) echo "unknown mount kind $1"; return 1 ;;
	esac
}

echo "=== NINEP-JOB BEGIN ==="
i=0
mounted=""
while [ $i -lt "${NMOUNTS:-0}" ]; do
	eval "spec=\$MOUNT_$i"
	set -- $spec
	if out=$(mount9p "$@" 2>&1); then
		echo "ok mount $3"
		mounted="$3 $mounted"
	else
		echo "FAIL mount $3: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
	fi
	i=$((i + 1))
done
cd /tmp
sh /job/run.sh
rc=$?
cd /
for t in $mounted; do
	if out=$(umount "$t" 2>&1); then echo "ok umount $t"; else echo "FAIL umount $t: $out"; fi
done
echo "=== NINEP-JOB END rc=$rc ==="
poweroff -f

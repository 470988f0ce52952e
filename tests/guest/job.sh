#!/bin/sh
# The correctness job the test guest runs on its 9p mounts (busybox sh).
#
# $M is the main mount (cache=none), $M2 a second mount of the same export with cache=mmap,
# $SEED a directory the host filled before boot (seed/big: 10 000 empty files f00000..f09999).
# Every step prints "ok NAME" or "FAIL NAME: reason"; "info ..." lines carry facts the host
# checks afterwards (checksums of the files left in $M/keep). Steps run under `set -e` in a
# subshell inside their own directory $M/work/NAME, so a failing command ends just that step.
# $STEPS (space separated) restricts the run to some steps, for debugging.

M=${M:-/mnt}
M2=${M2:-/mnt2}
MSIZE=${MSIZE:-512000}
SEED=${SEED:-$M/seed}
W=$M/work
K=$M/keep
T=/tmp/job
mkdir -p $T

eq() {  # actual expected what
	[ "$1" = "$2" ] || { echo "$3: got '$1', expected '$2'"; return 1; }
}
# read in 1 MiB requests: busybox md5sum reads 4 KiB at a time, one 9P round trip each (cache=none)
md5() { dd if="$1" bs=1048576 2>/dev/null | md5sum | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

step() {
	name=$1
	case " ${STEPS:-$name} " in *" $name "*) ;; *) return 0 ;; esac
	t0=$(t9tool now)
	out=$( (set -e; mkdir -p "$W/$name"; cd "$W/$name"; "t_$name") 2>&1)
	rc=$?
	t1=$(t9tool now)
	echo "$out" | grep '^info ' || true
	if [ $rc -eq 0 ]; then
		echo "ok $name"
	else
		echo "FAIL $name: $(echo "$out" | grep -v '^info ' | tail -n 4 | tr '\n' ' ')"
	fi
	echo "info time $name $(echo "$t0 $t1" | awk '{printf "%.3f", $2 - $1}')"
}

t_create() {
	: > empty
	[ -f empty ]
	eq "$(size empty)" 0 "size of new empty file"
	echo hello > hello
	eq "$(cat hello)" hello "content"
	ls | grep -qx hello
	mkdir sub
	[ -d sub ]
	echo more > sub/f
	eq "$(ls sub)" f "listing of a new directory"
}

t_small() {
	printf 'ninep small file\n' > "$K/small"
	eq "$(cat "$K/small")" "ninep small file" "content"
	eq "$(md5 "$K/small")" "$(printf 'ninep small file\n' | md5sum | cut -d' ' -f1)" "md5"
	echo "info md5 keep/small $(md5 "$K/small")"
}

t_onemeg() {
	dd if=/dev/urandom of=$T/1m bs=1024 count=1024 2>/dev/null
	cp $T/1m "$K/1m"
	eq "$(size "$K/1m")" 1048576 "size"
	eq "$(md5 "$K/1m")" "$(md5 $T/1m)" "md5 read back"
	echo "info md5 keep/1m $(md5 $T/1m)"
}

t_overmsize() {
	n=$((MSIZE * 3 + 4321))
	head -c $n /dev/urandom > $T/om
	# writes of 2*msize must be split by the client; reads of 4 KiB cross message boundaries
	dd if=$T/om of="$K/overmsize" bs=$((MSIZE * 2)) 2>/dev/null
	eq "$(size "$K/overmsize")" $n "size"
	eq "$(md5 "$K/overmsize")" "$(md5 $T/om)" "md5 read back"
	eq "$(dd if="$K/overmsize" bs=4096 2>/dev/null | md5sum | cut -d' ' -f1)" "$(md5 $T/om)" "md5 with 4 KiB reads"
	echo "info md5 keep/overmsize $(md5 $T/om)"
}

t_sparse() {
	head -c 4096 /dev/urandom > $T/blk
	for f in "$K/sparse" $T/sparse; do
		dd if=$T/blk of="$f" bs=4096 seek=0 conv=notrunc 2>/dev/null
		dd if=$T/blk of="$f" bs=4096 seek=8000 conv=notrunc 2>/dev/null
		dd if=$T/blk of="$f" bs=4096 seek=16383 conv=notrunc 2>/dev/null
	done
	eq "$(size "$K/sparse")" 67108864 "size"
	if [ "${SPARSE_BLOCKS:-1}" = 1 ]; then
		blocks=$(stat -c %b "$K/sparse")
		[ "$blocks" -lt 4096 ] || { echo "not sparse: $blocks blocks of 512"; return 1; }
	fi
	eq "$(md5 "$K/sparse")" "$(md5 $T/sparse)" "md5 of the 64 MiB sparse file"
	eq "$(dd if="$K/sparse" bs=4096 skip=8000 count=1 2>/dev/null | md5sum | cut -d' ' -f1)" "$(md5 $T/blk)" "block in the middle"
	eq "$(dd if="$K/sparse" bs=4096 skip=100 count=1 2>/dev/null | tr -d '\000' | wc -c)" 0 "hole reads as zeros"
	echo "info md5 keep/sparse $(md5 $T/sparse)"
}

t_append() {
	printf a > f
	printf b >> f
	printf 'c\n' >> f
	eq "$(cat f)" abc "content after appends"
	eq "$(size f)" 4 "size"
}

t_truncate() {
	printf 0123456789 > f
	truncate -s 100000 f
	eq "$(size f)" 100000 "size after truncate up"
	eq "$(head -c 10 f)" 0123456789 "old content kept"
	eq "$(tail -c +11 f | tr -d '\000' | wc -c)" 0 "extension reads as zeros"
	truncate -s 3 f
	eq "$(size f)" 3 "size after truncate down"
	eq "$(cat f)" 012 "content after truncate down"
	: > f
	eq "$(size f)" 0 "size after O_TRUNC"
}

t_rename() {
	echo one > a
	mv a b
	[ ! -e a ]
	eq "$(cat b)" one "renamed file"
	mkdir d1
	echo x > d1/in
	mv d1 d2
	[ ! -e d1 ]
	eq "$(cat d2/in)" x "file inside renamed directory"
	echo new > src
	echo old > dst
	mv src dst
	[ ! -e src ]
	eq "$(cat dst)" new "rename over an existing file"
	mkdir e1 e2
	echo y > e1/f
	t9tool rename e1 e2
	[ ! -e e1 ]
	eq "$(cat e2/f)" y "directory renamed over an empty directory"
	mkdir s
	mv b s/b
	eq "$(cat s/b)" one "rename across directories"
	eq "$(ls)" "$(printf 'd2\ndst\ne2\ns')" "directory listing after renames"
}

t_hardlink() {
	echo data > h1
	ln h1 h2
	eq "$(stat -c %h h1)" 2 "link count after ln"
	eq "$(stat -c %i h2)" "$(stat -c %i h1)" "inode of both names"
	echo more >> h2
	eq "$(cat h1)" "$(printf 'data\nmore')" "write through the other name"
	mkdir d
	ln h1 d/h3
	eq "$(stat -c %h h1)" 3 "link count with a third name"
	rm h2
	eq "$(stat -c %h h1)" 2 "link count after rm"
	rm d/h3
	eq "$(stat -c %h h1)" 1 "link count back to one"
}

t_symlink() {
	echo tgt > target
	ln -s target l
	[ -L l ]
	eq "$(readlink l)" target "readlink"
	eq "$(cat l)" tgt "read through the link"
	ln -s /no/such/place dangling
	[ -L dangling ]
	[ ! -e dangling ]
	eq "$(readlink dangling)" /no/such/place "readlink of a dangling link"
	long=$(printf '%0200d' 0 | tr 0 x)
	ln -s "$long" longlink
	eq "$(readlink longlink)" "$long" "200-character target"
	mkdir d
	ln -s ../target d/up
	eq "$(cat d/up)" tgt "relative link into the parent"
	eq "$(stat -c %F l)" "symbolic link" "file type"
}

t_deep() {
	p=deep
	for i in $(seq 1 30); do p=$p/d$i; done
	mkdir -p "$p"
	echo bottom > "$p/f"
	eq "$(cat "$p/f")" bottom "file at depth 30"
	eq "$(find deep -type d | wc -l)" 31 "directories found (deep and 30 below it)"
	mkdir -p "$p"
}

t_rmrf() {
	mkdir -p t/a/b/c t/x
	for i in 1 2 3 4 5; do echo $i > t/a/f$i; echo $i > t/a/b/c/g$i; done
	ln -s a t/link
	ln t/a/f1 t/x/hard
	rm -rf t
	[ ! -e t ]
	eq "$(ls -a | tr '\n' ' ')" ". .. " "directory empty after rm -rf"
}

t_chmod() {
	echo x > f
	chmod 0751 f
	eq "$(stat -c %a f)" 751 "mode"
	chmod 4755 f
	eq "$(stat -c %a f)" 4755 "setuid mode"
	chmod 0 f
	eq "$(stat -c %a f)" 0 "mode 0"
	mkdir d
	chmod 0700 d
	eq "$(stat -c %a d)" 700 "directory mode"
	chmod 1777 d
	eq "$(stat -c %a d)" 1777 "sticky directory"
}

t_chown() {
	echo x > f
	chown 1234:5678 f
	eq "$(stat -c '%u %g' f)" "1234 5678" "owner"
	chown 42 f
	eq "$(stat -c '%u %g' f)" "42 5678" "owner only"
	mkdir d
	chown 7:8 d
	eq "$(stat -c '%u %g' d)" "7 8" "directory owner"
	echo kept > "$K/owned"
	chown 1234:5678 "$K/owned"
}

t_times() {
	echo x > f
	touch -d '2001-02-03 04:05:06' f
	eq "$(stat -c %Y f)" 981173106 "mtime from touch -d"
	# Linux 6.1's 9p superblock keeps 1 s timestamp granularity, so the guest can only set whole
	# seconds; nanoseconds are checked on the way back with a file the host timed (seed/timed).
	t9tool utimens f 981173106 0 981173107 0
	eq "$(t9tool times f)" "981173106.000000000 981173107.000000000" "atime and mtime"
	eq "$(t9tool times "$SEED/timed")" "1234567890.123456789 1234567891.987654321" "host-set times with nanoseconds"
	mkdir d
	t9tool utimens d 1000000000 0 1000000001 0
	eq "$(t9tool times d)" "1000000000.000000000 1000000001.000000000" "directory times"
	ln -s f l
	t9tool utimens l 1200000000 0 1200000001 0
	eq "$(t9tool times l)" "1200000000.000000000 1200000001.000000000" "symlink's own times"
	eq "$(stat -c %Y f)" 981173107 "target untouched by the symlink's times"
	old=$(stat -c %Y f)
	echo more >> f
	[ "$(stat -c %Y f)" -gt "$old" ] || { echo "mtime did not advance on write"; return 1; }
	t9tool utimens "$K/small" 1300000000 0 1300000001 0
}

t_mkfifo() {
	mkfifo p
	[ -p p ]
	eq "$(stat -c %F p)" fifo "file type"
	(echo through-fifo > p) &
	read -r line < p
	wait
	eq "$line" through-fifo "data through the fifo"
}

t_xattr() {
	echo x > f
	t9tool setx f user.ninep value1
	eq "$(t9tool getx f user.ninep)" value1 "getxattr"
	t9tool listx f | grep -qx user.ninep
	t9tool setx f user.ninep value-two
	eq "$(t9tool getx f user.ninep)" value-two "replaced value"
	t9tool setx f user.second 2
	eq "$(t9tool listx f | grep -c '^user\.')" 2 "listed user.* names"
	t9tool rmx f user.ninep
	out=$(t9tool getx f user.ninep) && { echo "removed xattr still readable: $out"; return 1; }
	echo "$out" | grep -q "No data available"
	mkdir d
	t9tool setx d user.dir yes
	eq "$(t9tool getx d user.dir)" yes "xattr on a directory"
	t9tool setx "$K/small" user.kept kept-value
}

t_flock() { t9tool flocktest f; }
t_fcntl() { t9tool fcntltest f; }

t_readdir() {
	# t9tool names reads the directory without stat()ing each entry (busybox ls and find would
	# add 10 000 getattr round trips, minutes under TCG)
	t9tool names "$SEED/big" > $T/names
	eq "$(wc -l < $T/names)" 10002 "entries read (with . and ..)"
	eq "$(grep -c '^\.\.\?$' $T/names)" 2 ". and .."
	eq "$(grep '^f' $T/names | sort | md5sum)" "$(awk 'BEGIN{for(i=0;i<10000;i++) printf "f%05d\n", i}' | md5sum)" "names read"
}

t_unlinkopen() { t9tool unlinkopen f; }

t_df() {
	set -- $(stat -f -c '%b %a %S' "$M")
	[ "$1" -gt 0 ] || { echo "statfs reports $1 blocks"; return 1; }
	[ "$2" -le "$1" ] || { echo "available $2 > total $1"; return 1; }
	[ "$3" -gt 0 ]
	df -k "$M" | tail -n 1 | awk '{ if ($2 <= 0) { print "df total " $2; exit 1 } }'
}

t_tar() {
	mkdir -p src/a/b src/c
	for i in 1 2 3; do head -c $((i * 30000)) /dev/urandom > src/a/f$i; done
	echo small > src/a/b/s
	: > src/c/empty
	ln -s ../a/f1 src/c/link
	chmod 0600 src/a/f2
	mkdir dst
	tar cf - src | (cd dst && tar xf -)
	diff -r src dst/src
	eq "$(readlink dst/src/c/link)" ../a/f1 "symlink through tar"
	eq "$(stat -c %a dst/src/a/f2)" 600 "mode through tar"
	tar cf - -C / lib | (cd dst && tar xf -)
	diff -r /lib dst/lib
}

t_mmap() {
	# a writable shared mapping needs cache=mmap ($M2); the cache=none mount must see the data
	t9tool mmapw "$M2/work/mmap/f" 1000000
	t9tool pattern "$W/mmap/f" 1000000
}

t_cleanup() {
	cd "$M"
	rm -rf "$W"
	[ ! -e "$W" ]
	ls "$M" | grep -qx keep
}

grep ' 9p ' /proc/mounts | sed 's/^/info mount /'
rm -rf "$W" "$K"
mkdir -p "$W" "$K"
for s in create small onemeg overmsize sparse append truncate rename hardlink symlink deep rmrf \
	chmod chown times mkfifo xattr flock fcntl readdir unlinkopen df tar mmap; do
	step $s
done
name=cleanup
case " ${STEPS:-cleanup} " in *" cleanup "*)
	if out=$( (set -e; t_cleanup) 2>&1); then echo "ok cleanup"; else echo "FAIL cleanup: $out"; fi ;;
esac
exit 0

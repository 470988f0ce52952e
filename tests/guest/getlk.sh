#!/bin/sh
# The F_GETLK job (busybox sh): what a guest's fcntl(F_GETLK) reports on the 9p mount $M
# (cache=none) when the lock is held by nobody, by a host process, by another 9P connection,
# by another guest process through the second mount $M2, or by the asking process itself.
#
# Linux's client answers F_GETLK from its own lock list when the guest holds a conflicting
# lock; otherwise it sends Tgetlock of type UNLCK ("any conflicting lock on this range?") and
# reports the server's answer, the holder's pid negated (a remote lock's l_pid).
#
# Before boot the host seeded lkrd (read-locked [10,30) by host process $HOSTPID), lkwr
# (write-locked from 100 to end of file by the same process) and lkconn (write-locked [5,15) as
# proc_id 4242 through another 9P connection, kept open for the whole boot).
# QEMU=1: QEMU's own server, which keeps no locks (every Tlock succeeds, every Tgetlock answers
# UNLCK): the steps that need the server to know a lock expect "unlck" there instead.
# HOST=0: no host-locked files (a memory: export); those steps are skipped.
# OTHER_SERVER=1: $M2 is served by another server process than $M (see t_mount).
# Every step prints "ok NAME" or "FAIL NAME: reason".

M=${M:-/mnt}
M2=${M2:-/mnt2}
W=$M/getlk
W2=$M2/getlk

eq() {  # actual expected what
	[ "$1" = "$2" ] || { echo "$3: got '$1', expected '$2'"; return 1; }
}

step() {
	name=$1
	out=$( (set -e; "t_$name") 2>&1)
	if [ $? -eq 0 ]; then echo "ok getlk-$name"; else echo "FAIL getlk-$name: $(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi
}

# what the server reports for a lock it knows, or "unlck" from QEMU's server
known() { if [ "${QEMU:-0}" = 1 ]; then echo unlck; else echo "$1"; fi; }

t_free() {
	: > "$W/free"
	eq "$(t9tool getlk "$W/free" w 0 0)" unlck "write test on an unlocked file"
	eq "$(t9tool getlk "$W/free" r 10 5)" unlck "read test on an unlocked file"
}

t_self() {
	: > "$W/self"
	eq "$(t9tool getlk "$W/self" w 0 0 self "$W/self" w 0 100)" unlck "own write lock"
	eq "$(t9tool getlk "$W/self" w 50 1 self "$W/self" r 0 0)" unlck "own read lock"
}

t_hostrd() {
	eq "$(t9tool getlk "$M/lkrd" w 0 0)" "$(known "rdlck 10 20 -$HOSTPID")" "host read lock"
	eq "$(t9tool getlk "$M/lkrd" w 15 100)" "$(known "rdlck 10 20 -$HOSTPID")" "host read lock, overlapping range"
	eq "$(t9tool getlk "$M/lkrd" w 0 10)" unlck "range before the host read lock"
	eq "$(t9tool getlk "$M/lkrd" w 30 0)" unlck "range after the host read lock"
}

t_hostwr() {
	eq "$(t9tool getlk "$M/lkwr" w 150 1)" "$(known "wrlck 100 0 -$HOSTPID")" "host write lock to EOF (write test)"
	eq "$(t9tool getlk "$M/lkwr" r 0 0)" "$(known "wrlck 100 0 -$HOSTPID")" "host write lock to EOF (read test)"
	eq "$(t9tool getlk "$M/lkwr" r 0 100)" unlck "range before the host write lock"
}

t_conn() {
	eq "$(t9tool getlk "$M/lkconn" w 0 0)" "$(known "wrlck 5 10 -4242")" "lock of another 9P connection"
	eq "$(t9tool getlk "$M/lkconn" r 14 1)" "$(known "wrlck 5 10 -4242")" "lock of another 9P connection (read test)"
	eq "$(t9tool getlk "$M/lkconn" w 15 0)" unlck "range after it"
}

t_mount() {
	# a child locks through the second mount (another connection, another guest inode); the
	# parent asks through the first: the guest kernel cannot know, the server must
	: > "$W/mnt"
	out=$(t9tool getlk "$W/mnt" w 0 0 child "$W2/mnt" w 20 10) || { echo "$out"; return 1; }
	pid=$(echo "$out" | sed -n 's/^holder //p')
	# OTHER_SERVER=1: the second mount is served by another server process (one vhost-user
	# back-end per device), which holds the lock as a host OFD lock: those carry no pid (0)
	[ "${OTHER_SERVER:-0}" = 1 ] && pid=0 || pid=-$pid
	eq "$(echo "$out" | tail -n 1)" "$(known "wrlck 20 10 $pid")" "lock of a guest process through the other mount"
}

grep " $M 9p " /proc/mounts | sed 's/^/info mount /'
rm -rf "$W"
mkdir -p "$W"
for s in free self mount; do step $s; done
if [ "${HOST:-1}" = 1 ]; then
	for s in hostrd hostwr; do step $s; done
	# Linux asks the server a write test even for F_GETLK(F_RDLCK) (Tgetlock carries UNLCK), so a
	# host read lock is reported to a read test too, where a local filesystem would say F_UNLCK.
	echo "info read-test-on-host-read-lock $(t9tool getlk "$M/lkrd" r 0 0)"
fi
[ "${CONN:-1}" = 1 ] && step conn
rm -rf "$W"
exit 0

/*
 * t9tool -- small checks busybox cannot do, run inside the test guest on a 9p mount.
 *
 * Each subcommand prints nothing and exits 0 on success, or prints one line saying what went
 * wrong and exits 1 (the job script turns that into "FAIL step: reason"). Subcommands:
 *   setx F NAME VALUE | getx F NAME | listx F | rmx F NAME    user.* xattrs
 *   flocktest F        flock() conflicts between two processes
 *   fcntltest F        fcntl() record locks between two processes (SETLK, GETLK, SETLKW)
 *   getlk F r|w START LEN [self|child HOLDF r|w HSTART HLEN]
 *                      F_GETLK on F; prints "TYPE START LEN PID" (TYPE unlck|rdlck|wrlck, the
 *                      answer's l_start/l_len/l_pid; for unlck just "unlck"). With "self" this
 *                      process first locks HOLDF itself, with "child" a forked child holds that
 *                      lock during the query and a first line "holder PID" names it.
 *   mmapw F SIZE       writable MAP_SHARED mapping, msync, then read() back
 *   pattern F SIZE     check F holds the mmapw pattern using read()
 *   unlinkopen F       unlink while open, then write/read/fstat/ftruncate through the fd
 *   utimens F AS ANS MS MNS | times F      exact timestamps
 *   rename A B         rename(2) as is (e.g. a directory over an empty one)
 *   names DIR          readdir() names, one a line, without stat()ing them (busybox ls stats)
 *   randread F COUNT BS   COUNT preads of BS bytes at pseudo-random aligned offsets
 *   many create|stat|unlink DIR N        N files f0..f(N-1)
 *   now                monotonic clock in seconds
 * It only touches the paths it is given.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#define FAILF(...)                                                                             \
	do {                                                                                   \
		printf(__VA_ARGS__);                                                           \
		printf("\n");                                                                  \
		fflush(stdout);                                                                \
		exit(1);                                                                       \
	} while (0)
#define CHECK(cond, what)                                                                      \
	do {                                                                                   \
		if (!(cond))                                                                   \
			FAILF("%s: %s", what, errno ? strerror(errno) : "unexpected result");  \
	} while (0)

static unsigned char pat(uint64_t i)
{
	return (unsigned char)(i * 131u + i / 4096u + 7u);
}

static int xopen(const char *p, int flags)
{
	int fd = open(p, flags, 0644);
	if (fd < 0)
		FAILF("open %s: %s", p, strerror(errno));
	return fd;
}

/* child reports through its exit status: 0 ok, else the step number that failed */
static int wait_child(pid_t pid)
{
	int st;
	if (waitpid(pid, &st, 0) < 0)
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
}

static void sync_read(int fd)
{
	char c;
	if (read(fd, &c, 1) != 1)
		_exit(90);
}

static void sync_write(int fd)
{
	if (write(fd, "x", 1) != 1)
		_exit(91);
}

static int cmd_flocktest(const char *f)
{
	int a2b[2], b2a[2];
	CHECK(pipe(a2b) == 0 && pipe(b2a) == 0, "pipe");
	int fd = xopen(f, O_RDWR | O_CREAT);
	CHECK(flock(fd, LOCK_EX) == 0, "parent flock LOCK_EX");
	pid_t pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		int cfd = open(f, O_RDWR);
		if (cfd < 0)
			_exit(1);
		if (flock(cfd, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
			_exit(2); /* must conflict with the parent's exclusive lock */
		if (flock(cfd, LOCK_SH | LOCK_NB) == 0 || errno != EWOULDBLOCK)
			_exit(3);
		sync_write(b2a[1]);
		sync_read(a2b[0]); /* parent has unlocked */
		if (flock(cfd, LOCK_EX | LOCK_NB) != 0)
			_exit(4);
		if (flock(cfd, LOCK_UN) != 0)
			_exit(5);
		if (flock(cfd, LOCK_SH | LOCK_NB) != 0)
			_exit(6);
		sync_write(b2a[1]);
		sync_read(a2b[0]); /* parent holds a shared lock too */
		if (flock(cfd, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
			_exit(7); /* upgrade must conflict with the parent's shared lock */
		_exit(0);
	}
	sync_read(b2a[0]);
	CHECK(flock(fd, LOCK_UN) == 0, "parent LOCK_UN");
	sync_write(a2b[1]);
	sync_read(b2a[0]);
	CHECK(flock(fd, LOCK_SH | LOCK_NB) == 0, "parent LOCK_SH beside child's LOCK_SH");
	sync_write(a2b[1]);
	int r = wait_child(pid);
	if (r != 0)
		FAILF("child step %d failed", r);
	return 0;
}

static int setlk(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
	return fcntl(fd, cmd, &fl);
}

static int cmd_fcntltest(const char *f)
{
	int a2b[2], b2a[2];
	CHECK(pipe(a2b) == 0 && pipe(b2a) == 0, "pipe");
	int fd = xopen(f, O_RDWR | O_CREAT);
	CHECK(setlk(fd, F_SETLK, F_WRLCK, 0, 100) == 0, "parent F_SETLK write [0,100)");
	pid_t parent = getpid();
	pid_t pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		int cfd = open(f, O_RDWR);
		if (cfd < 0)
			_exit(1);
		struct flock q = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 50, .l_len = 10 };
		if (fcntl(cfd, F_GETLK, &q) != 0)
			_exit(2);
		if (q.l_type != F_WRLCK || q.l_pid != parent)
			_exit(3); /* GETLK must describe the parent's lock */
		if (setlk(cfd, F_SETLK, F_WRLCK, 0, 10) == 0 || (errno != EAGAIN && errno != EACCES))
			_exit(4);
		if (setlk(cfd, F_SETLK, F_RDLCK, 90, 20) == 0)
			_exit(5); /* overlaps [90,100) */
		if (setlk(cfd, F_SETLK, F_WRLCK, 200, 10) != 0)
			_exit(6); /* disjoint range is free */
		sync_write(b2a[1]);
		/* blocks until the parent unlocks */
		if (setlk(cfd, F_SETLKW, F_WRLCK, 0, 10) != 0)
			_exit(7);
		sync_write(b2a[1]);
		sync_read(a2b[0]);
		_exit(0);
	}
	sync_read(b2a[0]);
	struct flock q = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 200, .l_len = 1 };
	CHECK(fcntl(fd, F_GETLK, &q) == 0, "parent F_GETLK");
	if (q.l_type != F_WRLCK || q.l_pid != pid)
		FAILF("parent F_GETLK does not see the child's lock at 200 (type %d pid %d)", q.l_type,
		      (int)q.l_pid);
	usleep(200000); /* let the child block in F_SETLKW */
	CHECK(setlk(fd, F_SETLK, F_UNLCK, 0, 100) == 0, "parent unlock");
	sync_read(b2a[0]);
	CHECK(setlk(fd, F_SETLK, F_WRLCK, 0, 5) != 0, "parent relock must conflict with child");
	sync_write(a2b[1]);
	int r = wait_child(pid);
	if (r != 0)
		FAILF("child step %d failed", r);
	return 0;
}

static short lock_type(const char *s)
{
	if (!strcmp(s, "r"))
		return F_RDLCK;
	if (!strcmp(s, "w"))
		return F_WRLCK;
	FAILF("lock type must be r or w, not '%s'", s);
}

static int cmd_getlk(int argc, char **argv)
{
	/* argv: F TYPE START LEN [self|child HOLDF HTYPE HSTART HLEN] */
	pid_t holder = -1;
	int c2p[2] = { -1, -1 }, p2c[2] = { -1, -1 };
	if (argc == 9) {
		short ht = lock_type(argv[6]);
		int hfd = xopen(argv[5], ht == F_WRLCK ? O_RDWR : O_RDONLY);
		if (!strcmp(argv[4], "self")) {
			CHECK(setlk(hfd, F_SETLK, ht, atoll(argv[7]), atoll(argv[8])) == 0, "own F_SETLK");
		} else if (!strcmp(argv[4], "child")) {
			CHECK(pipe(c2p) == 0 && pipe(p2c) == 0, "pipe");
			holder = fork();
			CHECK(holder >= 0, "fork");
			if (holder == 0) {
				if (setlk(hfd, F_SETLK, ht, atoll(argv[7]), atoll(argv[8])) != 0)
					_exit(1);
				sync_write(c2p[1]);
				sync_read(p2c[0]); /* hold the lock until the parent has asked */
				_exit(0);
			}
			sync_read(c2p[0]);
			printf("holder %d\n", (int)holder);
		} else {
			FAILF("holder must be self or child, not '%s'", argv[4]);
		}
	} else if (argc != 4) {
		FAILF("usage: getlk F r|w START LEN [self|child HOLDF r|w HSTART HLEN]");
	}
	int fd = xopen(argv[0], O_RDONLY);
	struct flock q = { .l_type = lock_type(argv[1]), .l_whence = SEEK_SET,
			   .l_start = atoll(argv[2]), .l_len = atoll(argv[3]) };
	int rc = fcntl(fd, F_GETLK, &q);
	int err = errno;
	if (holder > 0) {
		sync_write(p2c[1]);
		int r = wait_child(holder);
		if (r != 0)
			FAILF("lock holder failed (%d)", r);
	}
	errno = err;
	CHECK(rc == 0, "F_GETLK");
	if (q.l_type == F_UNLCK)
		printf("unlck\n");
	else
		printf("%s %lld %lld %d\n", q.l_type == F_RDLCK ? "rdlck" : q.l_type == F_WRLCK ? "wrlck" : "?",
		       (long long)q.l_start, (long long)q.l_len, (int)q.l_pid);
	return 0;
}

static int check_pattern_fd(int fd, size_t size, const char *how)
{
	static unsigned char buf[65536];
	uint64_t off = 0;
	for (;;) {
		ssize_t n = read(fd, buf, sizeof buf);
		CHECK(n >= 0, "read");
		if (n == 0)
			break;
		for (ssize_t i = 0; i < n; i++)
			if (buf[i] != pat(off + (uint64_t)i))
				FAILF("%s: byte %llu is %u, expected %u", how,
				      (unsigned long long)(off + (uint64_t)i), buf[i], pat(off + (uint64_t)i));
		off += (uint64_t)n;
	}
	if (off != size)
		FAILF("%s: read %llu bytes, expected %zu", how, (unsigned long long)off, size);
	return 0;
}

static int cmd_mmapw(const char *f, size_t size)
{
	int fd = xopen(f, O_RDWR | O_CREAT | O_TRUNC);
	CHECK(ftruncate(fd, (off_t)size) == 0, "ftruncate");
	unsigned char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(p != MAP_FAILED, "mmap MAP_SHARED PROT_WRITE");
	for (size_t i = 0; i < size; i++)
		p[i] = pat(i);
	CHECK(msync(p, size, MS_SYNC) == 0, "msync");
	CHECK(munmap(p, size) == 0, "munmap");
	CHECK(close(fd) == 0, "close");
	fd = xopen(f, O_RDONLY);
	check_pattern_fd(fd, size, "read back after msync");
	close(fd);
	/* and through a fresh read-only shared mapping */
	fd = xopen(f, O_RDONLY);
	p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	CHECK(p != MAP_FAILED, "mmap read-only");
	for (size_t i = 0; i < size; i++)
		if (p[i] != pat(i))
			FAILF("mapped byte %zu is %u, expected %u", i, p[i], pat(i));
	munmap(p, size);
	close(fd);
	return 0;
}

static int cmd_pattern(const char *f, size_t size)
{
	int fd = xopen(f, O_RDONLY);
	return check_pattern_fd(fd, size, "read()");
}

static int cmd_unlinkopen(const char *f)
{
	char buf[64];
	struct stat st;
	int fd = xopen(f, O_RDWR | O_CREAT | O_TRUNC);
	CHECK(write(fd, "hello", 5) == 5, "write before unlink");
	CHECK(unlink(f) == 0, "unlink");
	struct stat gone;
	if (stat(f, &gone) == 0 || errno != ENOENT)
		FAILF("stat after unlink: %s", errno ? strerror(errno) : "still exists");
	CHECK(pwrite(fd, " world", 6, 5) == 6, "pwrite after unlink");
	memset(buf, 0, sizeof buf);
	CHECK(pread(fd, buf, sizeof buf, 0) == 11, "pread after unlink");
	if (memcmp(buf, "hello world", 11) != 0)
		FAILF("read back '%.11s' after unlink", buf);
	CHECK(fstat(fd, &st) == 0, "fstat after unlink");
	if (st.st_size != 11)
		FAILF("fstat size %lld after unlink, expected 11", (long long)st.st_size);
	if (st.st_nlink != 0)
		FAILF("fstat nlink %lu after unlink, expected 0", (unsigned long)st.st_nlink);
	/* no ftruncate here: Linux 6.1's 9p client truncates by name, which an unlinked file lacks */
	CHECK(close(fd) == 0, "close");
	return 0;
}

static int cmd_utimens(const char *f, char **a)
{
	struct timespec ts[2] = { { atol(a[0]), atol(a[1]) }, { atol(a[2]), atol(a[3]) } };
	CHECK(utimensat(AT_FDCWD, f, ts, AT_SYMLINK_NOFOLLOW) == 0, "utimensat");
	return 0;
}

static int cmd_times(const char *f)
{
	struct stat st;
	CHECK(lstat(f, &st) == 0, "lstat");
	printf("%lld.%09ld %lld.%09ld\n", (long long)st.st_atim.tv_sec, st.st_atim.tv_nsec,
	       (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
	return 0;
}

static int cmd_names(const char *d)
{
	DIR *dir = opendir(d);
	CHECK(dir != NULL, "opendir");
	struct dirent *e;
	errno = 0;
	while ((e = readdir(dir)) != NULL)
		printf("%s\n", e->d_name);
	CHECK(errno == 0, "readdir");
	closedir(dir);
	return 0;
}

static int cmd_randread(const char *f, long count, long bs)
{
	int fd = xopen(f, O_RDONLY);
	struct stat st;
	CHECK(fstat(fd, &st) == 0, "fstat");
	long blocks = st.st_size / bs;
	if (blocks <= 0)
		FAILF("file smaller than one block");
	char *buf = malloc((size_t)bs);
	uint64_t x = 88172645463325252ull;
	for (long i = 0; i < count; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		off_t off = (off_t)(x % (uint64_t)blocks) * bs;
		if (pread(fd, buf, (size_t)bs, off) != bs)
			FAILF("pread at %lld: %s", (long long)off, strerror(errno));
	}
	free(buf);
	return 0;
}

static int cmd_many(const char *op, const char *dir, long n)
{
	char p[4096];
	struct stat st;
	for (long i = 0; i < n; i++) {
		snprintf(p, sizeof p, "%s/f%ld", dir, i);
		if (strcmp(op, "create") == 0) {
			int fd = open(p, O_WRONLY | O_CREAT | O_EXCL, 0644);
			CHECK(fd >= 0, "create");
			close(fd);
		} else if (strcmp(op, "stat") == 0) {
			CHECK(stat(p, &st) == 0, "stat");
		} else if (strcmp(op, "unlink") == 0) {
			CHECK(unlink(p) == 0, "unlink");
		} else {
			FAILF("unknown op %s", op);
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	errno = 0;
	const char *c = argc > 1 ? argv[1] : "";
#define NEED(n)                                                                                \
	if (argc < (n) + 2)                                                                    \
	FAILF("usage: t9tool %s needs %d arguments", c, n)
	if (!strcmp(c, "setx")) {
		NEED(3);
		CHECK(setxattr(argv[2], argv[3], argv[4], strlen(argv[4]), 0) == 0, "setxattr");
	} else if (!strcmp(c, "getx")) {
		NEED(2);
		char v[4096];
		ssize_t n = getxattr(argv[2], argv[3], v, sizeof v);
		CHECK(n >= 0, "getxattr");
		printf("%.*s\n", (int)n, v);
	} else if (!strcmp(c, "listx")) {
		NEED(1);
		char v[65536];
		ssize_t n = listxattr(argv[2], v, sizeof v);
		CHECK(n >= 0, "listxattr");
		for (ssize_t i = 0; i < n; i += (ssize_t)strlen(v + i) + 1)
			printf("%s\n", v + i);
	} else if (!strcmp(c, "rmx")) {
		NEED(2);
		CHECK(removexattr(argv[2], argv[3]) == 0, "removexattr");
	} else if (!strcmp(c, "flocktest")) {
		NEED(1);
		return cmd_flocktest(argv[2]);
	} else if (!strcmp(c, "fcntltest")) {
		NEED(1);
		return cmd_fcntltest(argv[2]);
	} else if (!strcmp(c, "getlk")) {
		NEED(4);
		return cmd_getlk(argc - 2, argv + 2);
	} else if (!strcmp(c, "mmapw")) {
		NEED(2);
		return cmd_mmapw(argv[2], (size_t)atol(argv[3]));
	} else if (!strcmp(c, "pattern")) {
		NEED(2);
		return cmd_pattern(argv[2], (size_t)atol(argv[3]));
	} else if (!strcmp(c, "unlinkopen")) {
		NEED(1);
		return cmd_unlinkopen(argv[2]);
	} else if (!strcmp(c, "utimens")) {
		NEED(5);
		return cmd_utimens(argv[2], argv + 3);
	} else if (!strcmp(c, "times")) {
		NEED(1);
		return cmd_times(argv[2]);
	} else if (!strcmp(c, "rename")) {
		NEED(2);
		CHECK(rename(argv[2], argv[3]) == 0, "rename");
	} else if (!strcmp(c, "names")) {
		NEED(1);
		return cmd_names(argv[2]);
	} else if (!strcmp(c, "randread")) {
		NEED(3);
		return cmd_randread(argv[2], atol(argv[3]), atol(argv[4]));
	} else if (!strcmp(c, "many")) {
		NEED(3);
		return cmd_many(argv[2], argv[3], atol(argv[4]));
	} else if (!strcmp(c, "now")) {
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		printf("%lld.%06ld\n", (long long)ts.tv_sec, ts.tv_nsec / 1000);
	} else {
		FAILF("unknown subcommand '%s'", c);
	}
	return 0;
}

/*
 * relay PORT FDNO CMD [ARGS...] -- runs inside the test guest.
 *
 * Linux's 9p trans=fd cannot use a virtio-serial port fd directly (virtio_console has no
 * write_iter, so kernel writes fail), so this makes a socketpair, leaves two background
 * processes copying bytes between the port and one end (one process per direction, so neither
 * direction can stall the other), and execs CMD (the mount) with the other end on FDNO.
 * It never interprets the bytes it copies.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[256 * 1024];

static void pump(int from, int to)
{
	for (;;) {
		ssize_t n = read(from, buf, sizeof buf);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			_exit(n < 0);
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(to, buf + off, (size_t)(n - off));
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0)
				_exit(1);
			off += w;
		}
	}
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: relay PORT FDNO CMD [ARGS...]\n");
		return 2;
	}
	int fdno = atoi(argv[2]);
	int port = open(argv[1], O_RDWR | O_CLOEXEC);
	if (port < 0) {
		perror(argv[1]);
		return 1;
	}
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		perror("socketpair");
		return 1;
	}
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		close(sv[1]);
		setsid();
		/* let go of the caller's stdio: a shell's $(...) around the mount waits for its EOF */
		int null = open("/dev/null", O_RDWR);
		if (null >= 0) {
			dup2(null, 0);
			dup2(null, 1);
			dup2(null, 2);
			if (null > 2)
				close(null);
		}
		signal(SIGPIPE, SIG_DFL);
		pid_t back = fork();
		if (back < 0)
			_exit(1);
		if (back == 0)
			pump(sv[0], port); /* guest kernel requests -> host server */
		pump(port, sv[0]);         /* host server replies -> guest kernel */
	}
	close(port);
	close(sv[0]);
	if (sv[1] != fdno) {
		if (dup2(sv[1], fdno) < 0) {
			perror("dup2");
			return 1;
		}
		close(sv[1]);
	} else {
		fcntl(fdno, F_SETFD, 0);
	}
	execvp(argv[3], argv + 3);
	perror(argv[3]);
	return 127;
}

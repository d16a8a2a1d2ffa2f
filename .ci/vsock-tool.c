/* The tier's vsock endpoints, static so that both initramfs images can carry it
   (busybox has no vsock and no Unix-socket client):

     vsock-tool vsock-connect CID PORT    connect to (CID, PORT) over AF_VSOCK
     vsock-tool vsock-listen PORT         accept one connection on AF_VSOCK PORT
     vsock-tool vsock-hold CID PORT       connect, then wait until the connection ends;
                                          prints how it ended (errno name or "eof")
     vsock-tool hybrid-connect UDS PORT   Firecracker's host side: CONNECT PORT on the
                                          device's socket, OK awaited (retried for 60 s
                                          while the guest refuses)
     vsock-tool unix-serve PATH           accept one connection on a Unix socket at PATH
     vsock-tool unix-hold PATH            accept one, wait until it ends
     vsock-tool unix-echo PATH            accept connections forever, echo each
     vsock-tool unix-echo-one PATH        accept one, echo it to its end, then print
                                          "echoed <bytes> bytes"
     vsock-tool unix-sink PATH            accept connections forever, read each to its end
     vsock-tool tcp-echo PORT, tcp-sink PORT   the same on TCP (0.0.0.0:PORT)
     vsock-tool bench-vsock CID PORT BYTES N
     vsock-tool bench-tcp IP PORT BYTES N
                                          BYTES to a sink at PORT (the time until it has
                                          them all: it closes after the end), then N
                                          connections to an echo at PORT + 1, a byte
                                          there and back on each; prints
                                          "throughput <MiB/s> MiB/s connect+rtt <us> us"

   The connect, listen and serve forms copy stdin to the connection (then shut down
   its sending side) and the connection to stdout, both at once, until both ends are
   done. Exit 0, or 1 with the failed call on stderr. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int die(const char *what)
{
    fprintf(stderr, "vsock-tool: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* stdin -> s and s -> stdout at once. The socket is non-blocking: a write that would
   block waits for POLLOUT while what comes in is still read (two peers that both
   send more than the buffers between them hold must not both block in write). */
static void pump(int s)
{
    static char out[65536], in[65536];
    size_t out_len = 0, out_off = 0;
    int in_open = 1, sock_open = 1, shut = 0;
    int flags = fcntl(s, F_GETFL);
    if (flags < 0 || fcntl(s, F_SETFL, flags | O_NONBLOCK) < 0)
        die("fcntl");
    while (in_open || out_len || sock_open) {
        if (!in_open && !out_len && !shut) {
            shutdown(s, SHUT_WR);
            shut = 1;
        }
        struct pollfd p[2] = {
            {in_open && !out_len ? 0 : -1, POLLIN, 0},
            {s, (short)((sock_open ? POLLIN : 0) | (out_len ? POLLOUT : 0)), 0},
        };
        if (!p[1].events)
            p[1].fd = -1;
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (p[0].revents) {
            ssize_t n = read(0, out, sizeof out);
            if (n < 0)
                die("read stdin");
            if (n == 0)
                in_open = 0;
            out_len = (size_t)n;
            out_off = 0;
        }
        if (out_len && (p[1].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t w = write(s, out + out_off, out_len - out_off);
            if (w < 0 && errno != EAGAIN && errno != EINTR)
                die("write to the connection");
            if (w > 0) {
                out_off += (size_t)w;
                if (out_off == out_len)
                    out_len = 0;
            }
        }
        if (sock_open && (p[1].revents & (POLLIN | POLLERR | POLLHUP))) {
            ssize_t n = read(s, in, sizeof in);
            if (n < 0 && errno != EAGAIN && errno != EINTR)
                die("read the connection");
            if (n == 0)
                sock_open = 0;
            if (n > 0 && write_all(1, in, (size_t)n) < 0)
                die("write stdout");
        }
    }
}

static void hold(int s)
{
    char c;
    for (;;) {
        ssize_t n = read(s, &c, 1);
        if (n == 0) {
            printf("eof\n");
            return;
        }
        if (n < 0 && errno != EINTR) {
            printf("%s\n", strerrorname_np(errno));
            return;
        }
    }
}

static int vsock_connect(unsigned cid, unsigned port)
{
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        die("socket(AF_VSOCK)");
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
        die("connect");
    return s;
}

static int vsock_accept(unsigned port)
{
    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (l < 0)
        die("socket(AF_VSOCK)");
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0)
        die("bind/listen");
    int s = accept(l, 0, 0);
    if (s < 0)
        die("accept");
    close(l);
    return s;
}

static struct sockaddr_un unix_addr(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) {
        errno = ENAMETOOLONG;
        die(path);
    }
    strcpy(a.sun_path, path);
    return a;
}

static int unix_listen(const char *path)
{
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = unix_addr(path);
    unlink(path);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 16) < 0)
        die("bind/listen");
    return l;
}

static int hybrid_connect(const char *uds, const char *port)
{
    for (int tries = 0; tries < 600; tries++) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = unix_addr(uds);
        if (s < 0)
            die("socket(AF_UNIX)");
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) {
            char line[64];
            snprintf(line, sizeof line, "CONNECT %s\n", port);
            if (write_all(s, line, strlen(line)) < 0)
                die("write CONNECT");
            /* The OK line, byte by byte: what follows is the guest's. */
            size_t n = 0;
            while (n < sizeof line - 1) {
                ssize_t r = read(s, &line[n], 1);
                if (r <= 0)
                    break;
                if (line[n++] == '\n')
                    break;
            }
            line[n] = 0;
            if (!strncmp(line, "OK ", 3)) {
                fprintf(stderr, "vsock-tool: %s", line);
                return s;
            }
        }
        close(s);
        usleep(100000);
    }
    errno = ECONNREFUSED;
    return die("CONNECT (no OK in 60 s)");
}

static int tcp_listen(const char *port)
{
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port))};
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 64) < 0)
        die("tcp bind/listen");
    return l;
}

/* Serve connections on listener l forever: echo each (or read it to its end). */
static void serve_forever(int l, int echo)
{
    for (;;) {
        int s = accept(l, 0, 0);
        if (s < 0)
            die("accept");
        if (fork() == 0) {
            static char buf[65536];
            ssize_t n;
            while ((n = read(s, buf, sizeof buf)) > 0)
                if (echo && write_all(s, buf, (size_t)n) < 0)
                    break;
            _exit(0);
        }
        close(s);
    }
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int tcp_connect(const char *ip, unsigned port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (s < 0 || inet_pton(AF_INET, ip, &a.sin_addr) != 1)
        die("tcp socket");
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
        die("tcp connect");
    return s;
}

/* The bench: `connect_to(port)` makes a connection either way. */
static void bench(int (*connect_to)(const char *, unsigned), const char *peer, unsigned port,
                  long bytes, int n)
{
    static char buf[65536];
    double t0 = now_s();
    int s = connect_to(peer, port);
    for (long left = bytes; left > 0;) {
        size_t k = left < (long)sizeof buf ? (size_t)left : sizeof buf;
        if (write_all(s, buf, k) < 0)
            die("write");
        left -= (long)k;
    }
    shutdown(s, SHUT_WR);
    while (read(s, buf, sizeof buf) > 0)
        ;
    close(s);
    double t1 = now_s();
    for (int i = 0; i < n; i++) {
        int e = connect_to(peer, port + 1);
        char c = 'x';
        if (write_all(e, &c, 1) < 0 || read(e, &c, 1) != 1)
            die("round trip");
        close(e);
    }
    double t2 = now_s();
    printf("throughput %.1f MiB/s connect+rtt %.0f us\n", (double)bytes / (1 << 20) / (t1 - t0),
           (t2 - t1) / n * 1e6);
}

static int vsock_to(const char *cid, unsigned port) { return vsock_connect(atoi(cid), port); }

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: see the comment at the top of vsock-tool.c\n");
        return 2;
    }
    const char *mode = argv[1];
    if (!strcmp(mode, "vsock-connect") && argc == 4)
        pump(vsock_connect(atoi(argv[2]), atoi(argv[3])));
    else if (!strcmp(mode, "vsock-listen"))
        pump(vsock_accept(atoi(argv[2])));
    else if (!strcmp(mode, "vsock-hold") && argc == 4) {
        int s = vsock_connect(atoi(argv[2]), atoi(argv[3]));
        printf("connected\n");
        fflush(stdout);
        hold(s);
    } else if (!strcmp(mode, "hybrid-connect") && argc == 4)
        pump(hybrid_connect(argv[2], argv[3]));
    else if (!strcmp(mode, "unix-serve")) {
        int s = accept(unix_listen(argv[2]), 0, 0);
        if (s < 0)
            die("accept");
        pump(s);
    } else if (!strcmp(mode, "unix-hold")) {
        int s = accept(unix_listen(argv[2]), 0, 0);
        if (s < 0)
            die("accept");
        hold(s);
    } else if (!strcmp(mode, "unix-echo"))
        serve_forever(unix_listen(argv[2]), 1);
    else if (!strcmp(mode, "unix-echo-one")) {
        int s = accept(unix_listen(argv[2]), 0, 0);
        if (s < 0)
            die("accept");
        static char buf[65536];
        ssize_t n;
        long total = 0;
        while ((n = read(s, buf, sizeof buf)) > 0 && write_all(s, buf, (size_t)n) == 0)
            total += n;
        printf("echoed %ld bytes\n", total);
    }
    else if (!strcmp(mode, "unix-sink"))
        serve_forever(unix_listen(argv[2]), 0);
    else if (!strcmp(mode, "tcp-echo"))
        serve_forever(tcp_listen(argv[2]), 1);
    else if (!strcmp(mode, "tcp-sink"))
        serve_forever(tcp_listen(argv[2]), 0);
    else if (!strcmp(mode, "bench-vsock") && argc == 6)
        bench(vsock_to, argv[2], (unsigned)atoi(argv[3]), atol(argv[4]), atoi(argv[5]));
    else if (!strcmp(mode, "bench-tcp") && argc == 6)
        bench(tcp_connect, argv[2], (unsigned)atoi(argv[3]), atol(argv[4]), atoi(argv[5]));
    else {
        fprintf(stderr, "vsock-tool: unknown mode %s\n", mode);
        return 2;
    }
    return 0;
}

/*
 * Reference UDP echo server for the udpdst benchmark: the practical limit.
 *
 * Does the job udpdst does, in C and in batches: one wildcard socket
 * ("::" dual-stack, or "0.0.0.0"), recvmmsg with IP_PKTINFO/IPV6_PKTINFO,
 * and sendmmsg replies that carry a pktinfo control message naming the
 * address the client sent to (spec_dst for IPv4, ifindex 0), so replies
 * leave from the right address.
 *
 * Usage: cserver.bin ADDRESS PORT     (PORT 0 picks a free one)
 *
 * Speaks the benchmark's control protocol on stdin/stdout, like the Python
 * servers in servers.py: prints "ready PORT" once listening; for each line
 * "m" on stdin prints "m UTIME STIME RX TX" (own rusage in seconds and
 * datagrams received/sent so far); exits when stdin closes.
 *
 * Build: gcc -O2 -Wall -o cserver.bin cserver.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define BUFSIZE 8192
#define CTRLSIZE 256

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static unsigned long long rx, tx;

static void report(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("m %ld.%06ld %ld.%06ld %llu %llu\n", (long)ru.ru_utime.tv_sec,
           (long)ru.ru_utime.tv_usec, (long)ru.ru_stime.tv_sec,
           (long)ru.ru_stime.tv_usec, rx, tx);
    fflush(stdout);
}

/* Handle control lines; returns 0 when stdin is closed. */
static int control(void)
{
    char buf[256];
    ssize_t n = read(0, buf, sizeof buf);
    if (n <= 0)
        return 0;
    for (ssize_t i = 0; i < n; i++)
        if (buf[i] == '\n')
            report();
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: cserver ADDRESS PORT\n");
        return 2;
    }
    int v6 = strchr(argv[1], ':') != NULL;
    int one = 1, zero = 0;
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_storage ss;
    socklen_t sslen;
    memset(&ss, 0, sizeof ss);
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(atoi(argv[2]));
        if (inet_pton(AF_INET6, argv[1], &a->sin6_addr) != 1)
            die("inet_pton");
        sslen = sizeof *a;
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof one);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(atoi(argv[2]));
        if (inet_pton(AF_INET, argv[1], &a->sin_addr) != 1)
            die("inet_pton");
        sslen = sizeof *a;
    }
    /* On a dual-stack socket too: IPv4 peers then bring spec_dst. */
    if (setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof one) < 0)
        die("IP_PKTINFO");
    if (bind(fd, (struct sockaddr *)&ss, sslen) < 0)
        die("bind");
    sslen = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sslen);
    printf("ready %d\n", ntohs(v6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                  : ((struct sockaddr_in *)&ss)->sin_port));
    fflush(stdout);

    static unsigned char bufs[BATCH][BUFSIZE];
    static char ctrl[BATCH][CTRLSIZE];
    static char rctrl[BATCH][CTRLSIZE];
    struct sockaddr_storage names[BATCH];
    struct iovec iov[BATCH], riov[BATCH];
    struct mmsghdr msgs[BATCH], replies[BATCH];
    struct pollfd pfd[2] = {{fd, POLLIN, 0}, {0, POLLIN, 0}};

    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (pfd[1].revents && !control())
            return 0;
        if (!(pfd[0].revents & POLLIN))
            continue;
        for (;;) {
            for (int i = 0; i < BATCH; i++) {
                iov[i].iov_base = bufs[i];
                iov[i].iov_len = BUFSIZE;
                memset(&msgs[i], 0, sizeof msgs[i]);
                msgs[i].msg_hdr.msg_name = &names[i];
                msgs[i].msg_hdr.msg_namelen = sizeof names[i];
                msgs[i].msg_hdr.msg_iov = &iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
                msgs[i].msg_hdr.msg_control = ctrl[i];
                msgs[i].msg_hdr.msg_controllen = CTRLSIZE;
            }
            int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                if (errno == EINTR || errno == ECONNREFUSED)
                    continue;
                die("recvmmsg");
            }
            rx += n;
            int k = 0;
            for (int i = 0; i < n; i++) {
                struct msghdr *m = &msgs[i].msg_hdr;
                if (m->msg_flags & (MSG_TRUNC | MSG_CTRUNC))
                    continue;
                struct mmsghdr *r = &replies[k];
                memset(r, 0, sizeof *r);
                riov[k].iov_base = bufs[i];
                riov[k].iov_len = msgs[i].msg_len;
                r->msg_hdr.msg_name = &names[i];
                r->msg_hdr.msg_namelen = m->msg_namelen;
                r->msg_hdr.msg_iov = &riov[k];
                r->msg_hdr.msg_iovlen = 1;
                size_t clen = 0;
                for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
                    /* One control message at offset 0: IP_PKTINFO overwrites IPV6_PKTINFO. */
                    struct cmsghdr *o = (struct cmsghdr *)rctrl[k];
                    if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
                        struct in_pktinfo in, out = {0};
                        memcpy(&in, CMSG_DATA(c), sizeof in);
                        out.ipi_spec_dst = in.ipi_spec_dst;
                        o->cmsg_level = IPPROTO_IP;
                        o->cmsg_type = IP_PKTINFO;
                        o->cmsg_len = CMSG_LEN(sizeof out);
                        memcpy(CMSG_DATA(o), &out, sizeof out);
                        clen = CMSG_SPACE(sizeof out);
                        break;
                    }
                    if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO) {
                        struct in6_pktinfo in, out = {0};
                        memcpy(&in, CMSG_DATA(c), sizeof in);
                        out.ipi6_addr = in.ipi6_addr;
                        /* Link-local needs the interface; others must not pin it. */
                        if (IN6_IS_ADDR_LINKLOCAL(&in.ipi6_addr))
                            out.ipi6_ifindex = in.ipi6_ifindex;
                        o->cmsg_level = IPPROTO_IPV6;
                        o->cmsg_type = IPV6_PKTINFO;
                        o->cmsg_len = CMSG_LEN(sizeof out);
                        memcpy(CMSG_DATA(o), &out, sizeof out);
                        clen = CMSG_SPACE(sizeof out);
                        /* keep looking: an IP_PKTINFO for a mapped peer wins */
                    }
                }
                if (clen) {
                    r->msg_hdr.msg_control = rctrl[k];
                    r->msg_hdr.msg_controllen = clen;
                }
                k++;
            }
            int off = 0;
            while (off < k) {
                int s = sendmmsg(fd, replies + off, k - off, 0);
                if (s < 0) {
                    if (errno == EINTR)
                        continue;
                    /* Drop the one that failed (e.g. address gone), go on. */
                    off++;
                    continue;
                }
                tx += s;
                off += s;
            }
            if (n < BATCH)
                break;
        }
    }
}

/*
 * Closed-loop UDP echo load generator for the udpdst benchmark.
 *
 * Opens --sockets CONNECTED UDP sockets to --host:--port and keeps --window
 * requests outstanding on each: every reply that comes back is answered with
 * a new request (batched with recvmmsg/sendmmsg). Because the sockets are
 * connected, the kernel only delivers replies whose source is exactly the
 * address we sent to: a reply from the wrong address never reaches us and
 * counts as lost.  No reply on a socket for --timeout-ms declares that
 * socket's outstanding requests timed out and refills its window (so a
 * server that answers from the wrong address is measured without stalling).
 *
 * After --duration seconds the client stops sending and waits up to
 * --drain seconds for the replies still in flight, then prints one JSON
 * object on stdout:
 *   sent, received, lost (= sent - received), late (replies that came after
 *   their request had timed out; they are counted as received), timeouts,
 *   bad (replies whose payload we did not send), rcvbuf_drops (datagrams the
 *   kernel dropped on our own sockets, from SO_RXQ_OVFL), elapsed (s, from
 *   the first send to the last reply), rate (received/elapsed) and the
 *   client's own cpu_s (getrusage), so the reader can check that the client
 *   was not the bottleneck, and rtt_p50_us / rtt_p99_us, the round-trip
 *   times of answered requests (µs; with --sockets 1 --window 1 the latency
 *   of one request at a time).
 *
 * Build: gcc -O2 -Wall -o client.bin client.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_RXQ_OVFL
#define SO_RXQ_OVFL 40
#endif

#define MAX_SOCKETS 64
#define BATCH 64
#define MAX_SIZE 65507
#define MAGIC 0x75647064u /* "udpd" */

struct hdr {
    uint32_t magic;
    uint32_t sock;
    uint64_t seq;
    uint64_t sent_ns; /* when the request left, for the round-trip time */
};

/* Round-trip times of answered requests, in µs buckets (the last one holds
 * everything slower), for the p50/p99 in the JSON. */
#define HIST 200000
static uint32_t rtt_hist[HIST];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The q-quantile (0..1) of the recorded round trips, in µs; -1 if none. */
static long rtt_quantile(double q)
{
    uint64_t total = 0, seen = 0;
    for (long i = 0; i < HIST; i++)
        total += rtt_hist[i];
    if (total == 0)
        return -1;
    for (long i = 0; i < HIST; i++) {
        seen += rtt_hist[i];
        if (seen >= (uint64_t)(q * total) && seen > 0)
            return i;
    }
    return HIST - 1;
}

struct sockstate {
    int fd;
    uint64_t next_seq;   /* next sequence number to send */
    uint64_t lost_mark;  /* requests below this were declared timed out */
    long outstanding;    /* requests sent and neither answered nor timed out */
    double last_progress;
    uint32_t ovfl;       /* last SO_RXQ_OVFL value seen */
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: client --host H --port P [--sockets N] [--window W] [--size B]\n"
            "              [--duration S] [--drain S] [--timeout-ms MS]\n");
    exit(2);
}

static uint64_t sent, received, late, timeouts, bad, rcvbuf_drops;
static size_t size = 64;
static unsigned char *txbuf[MAX_SOCKETS][BATCH];
static unsigned char *rxbuf[BATCH];

/* Send up to n new requests on s; returns how many the kernel took. */
static int send_requests(struct sockstate *s, int idx, int n)
{
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    int total = 0;

    while (n > 0) {
        int k = n > BATCH ? BATCH : n;
        for (int i = 0; i < k; i++) {
            struct hdr h = {MAGIC, (uint32_t)idx, s->next_seq + i, now_ns()};
            memcpy(txbuf[idx][i], &h, sizeof h);
            iov[i].iov_base = txbuf[idx][i];
            iov[i].iov_len = size;
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int r = sendmmsg(s->fd, msgs, k, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
                break;
            if (errno == ECONNREFUSED || errno == EINTR)
                continue; /* ICMP error from an earlier datagram; retry */
            die("sendmmsg");
        }
        s->next_seq += r;
        s->outstanding += r;
        sent += r;
        total += r;
        n -= r;
        if (r < k)
            break;
    }
    return total;
}

/* Read every reply waiting on s; returns how many answered live requests. */
static int read_replies(struct sockstate *s, int idx)
{
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    char ctrl[BATCH][CMSG_SPACE(sizeof(uint32_t))];
    int answered = 0;

    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = rxbuf[i];
            iov[i].iov_len = MAX_SIZE;
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_control = ctrl[i];
            msgs[i].msg_hdr.msg_controllen = sizeof ctrl[i];
        }
        int r = recvmmsg(s->fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno == ECONNREFUSED || errno == EINTR)
                continue;
            die("recvmmsg");
        }
        for (int i = 0; i < r; i++) {
            struct hdr h;
            struct msghdr *m = &msgs[i].msg_hdr;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL) {
                    uint32_t v;
                    memcpy(&v, CMSG_DATA(c), sizeof v);
                    rcvbuf_drops += (uint32_t)(v - s->ovfl);
                    s->ovfl = v;
                }
            }
            if (msgs[i].msg_len != size) {
                bad++;
                continue;
            }
            memcpy(&h, rxbuf[i], sizeof h);
            if (h.magic != MAGIC || h.sock != (uint32_t)idx || h.seq >= s->next_seq) {
                bad++;
                continue;
            }
            received++;
            if (h.seq < s->lost_mark) {
                late++;
            } else {
                s->outstanding--;
                answered++;
                uint64_t us = (now_ns() - h.sent_ns) / 1000u;
                rtt_hist[us < HIST ? us : HIST - 1]++;
            }
        }
        if (r < BATCH)
            break;
    }
    return answered;
}

int main(int argc, char **argv)
{
    const char *host = NULL, *port = NULL;
    int nsock = 4, window = 32;
    double duration = 2.0, drain = 0.5, timeout_ms = 200;

    static struct option opts[] = {
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {"sockets", required_argument, 0, 'n'},
        {"window", required_argument, 0, 'w'},
        {"size", required_argument, 0, 's'},
        {"duration", required_argument, 0, 'd'},
        {"drain", required_argument, 0, 'D'},
        {"timeout-ms", required_argument, 0, 't'},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'h': host = optarg; break;
        case 'p': port = optarg; break;
        case 'n': nsock = atoi(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 's': size = (size_t)atol(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'D': drain = atof(optarg); break;
        case 't': timeout_ms = atof(optarg); break;
        default: usage();
        }
    }
    if (!host || !port || nsock < 1 || nsock > MAX_SOCKETS || window < 1 ||
        size < sizeof(struct hdr) || size > MAX_SIZE || duration <= 0)
        usage();

    struct addrinfo hints = {0}, *ai;
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai) {
        fprintf(stderr, "client: %s: %s\n", host, gai_strerror(gai));
        return 2;
    }

    struct sockstate st[MAX_SOCKETS];
    struct pollfd pfd[MAX_SOCKETS];
    memset(st, 0, sizeof st);
    for (int i = 0; i < nsock; i++) {
        int fd = socket(ai->ai_family, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd < 0)
            die("socket");
        int one = 1, buf = 4 << 20;
        /* Our own buffers must never be the reason a reply is lost. */
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) < 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
        setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof one);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0)
            die("connect");
        st[i].fd = fd;
        pfd[i].fd = fd;
        pfd[i].events = POLLIN;
        for (int b = 0; b < BATCH; b++) {
            txbuf[i][b] = calloc(1, size);
            if (!txbuf[i][b])
                die("calloc");
        }
    }
    for (int b = 0; b < BATCH; b++) {
        rxbuf[b] = malloc(MAX_SIZE);
        if (!rxbuf[b])
            die("malloc");
    }
    freeaddrinfo(ai);

    double t0 = now(), t_stop = t0 + duration, t_end = t_stop + drain;
    double t_last_rx = t0;
    for (int i = 0; i < nsock; i++) {
        st[i].last_progress = t0;
        send_requests(&st[i], i, window);
    }

    int sending = 1;
    for (;;) {
        double t = now();
        if (sending && t >= t_stop)
            sending = 0;
        if (!sending) {
            long left = 0;
            for (int i = 0; i < nsock; i++)
                left += st[i].outstanding;
            if (left == 0 || t >= t_end)
                break;
        }
        int r = poll(pfd, nsock, 5);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        t = now();
        for (int i = 0; i < nsock; i++) {
            struct sockstate *s = &st[i];
            if (pfd[i].revents & (POLLIN | POLLERR)) {
                uint64_t before = received;
                int answered = read_replies(s, i);
                if (received != before) {
                    s->last_progress = t;
                    t_last_rx = t;
                }
                if (sending && answered > 0)
                    send_requests(s, i, answered);
            }
            if (s->outstanding > 0 && (t - s->last_progress) * 1000.0 >= timeout_ms) {
                timeouts += s->outstanding;
                s->lost_mark = s->next_seq;
                s->outstanding = 0;
                s->last_progress = t;
            }
            if (sending && s->outstanding < window)
                send_requests(s, i, (int)(window - s->outstanding));
        }
    }

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                 ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    double elapsed = t_last_rx - t0;
    if (elapsed <= 0)
        elapsed = now() - t0;
    printf("{\"sent\": %llu, \"received\": %llu, \"lost\": %lld, \"late\": %llu, "
           "\"timeouts\": %llu, \"bad\": %llu, \"rcvbuf_drops\": %llu, "
           "\"elapsed\": %.6f, \"rate\": %.1f, \"cpu_s\": %.6f, "
           "\"sockets\": %d, \"window\": %d, \"size\": %zu, "
           "\"rtt_p50_us\": %ld, \"rtt_p99_us\": %ld}\n",
           (unsigned long long)sent, (unsigned long long)received,
           (long long)(sent - received), (unsigned long long)late,
           (unsigned long long)timeouts, (unsigned long long)bad,
           (unsigned long long)rcvbuf_drops, elapsed, received / elapsed, cpu,
           nsock, window, size, rtt_quantile(0.5), rtt_quantile(0.99));
    return 0;
}

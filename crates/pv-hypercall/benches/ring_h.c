/*
 * The reference for benches/ring.rs: the same request/response job on a 4 KiB page,
 * written with Xen's own io/ring.h macros (Debian's libxen-dev) and Xen's x86-64
 * barriers (as xenctrl.h defines them), two busy-polling threads, 8-byte requests
 * and responses, `batch` items handled between index publications.
 *
 *   ring_h ITEMS BATCH   ->  prints items per second
 *
 * The bench builds it with `gcc -O2` when the headers are installed.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define xen_barrier() asm volatile("" : : : "memory")
#define xen_mb() asm volatile("lock addl $0, -32(%%rsp)" ::: "memory")
#define xen_rmb() xen_barrier()
#define xen_wmb() xen_barrier()
#define __XEN_TOOLS__ 1 /* the latest interface: ring.h uses the xen_*mb() above */
#include <xen/io/ring.h>

typedef struct { uint64_t v; } item_t;
DEFINE_RING_TYPES(bench, item_t, item_t);

static uint64_t items, batch;
static struct bench_sring *sring;

static inline void relax(void) { asm volatile("pause" ::: "memory"); }

static void *back_end(void *unused)
{
    struct bench_back_ring back;
    uint64_t next = 0;
    int notify;
    (void)unused;
    BACK_RING_INIT(&back, sring, 4096);
    while (next < items) {
        uint64_t n = 0;
        while (n < batch && RING_HAS_UNCONSUMED_REQUESTS(&back)) {
            item_t req;
            RING_COPY_REQUEST(&back, back.req_cons, &req);
            back.req_cons++;
            if (req.v != next) {
                fprintf(stderr, "request %llu out of order (want %llu)\n",
                        (unsigned long long)req.v, (unsigned long long)next);
                exit(1);
            }
            next++;
            n++;
            RING_GET_RESPONSE(&back, back.rsp_prod_pvt)->v = req.v;
            back.rsp_prod_pvt++;
        }
        if (n > 0)
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, notify);
        else
            relax();
    }
    (void)notify;
    return NULL;
}

int main(int argc, char **argv)
{
    struct bench_front_ring front;
    struct timespec t0, t1;
    pthread_t thread;
    uint64_t sent = 0, done = 0;
    int notify;

    if (argc != 3)
        return 2;
    items = strtoull(argv[1], NULL, 0);
    batch = strtoull(argv[2], NULL, 0);
    if (posix_memalign((void **)&sring, 4096, 4096))
        return 1;
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&front, sring, 4096);
    if (RING_SIZE(&front) != 256)
        return 3;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_create(&thread, NULL, back_end, NULL);
    while (done < items) {
        uint64_t n = 0;
        while (n < batch && sent < items && !RING_FULL(&front)) {
            RING_GET_REQUEST(&front, front.req_prod_pvt)->v = sent;
            front.req_prod_pvt++;
            sent++;
            n++;
        }
        if (n > 0)
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
        RING_IDX rp = front.sring->rsp_prod;
        xen_rmb();
        if (rp == front.rsp_cons)
            relax();
        while (front.rsp_cons != rp) {
            if (RING_GET_RESPONSE(&front, front.rsp_cons)->v != done) {
                fprintf(stderr, "response out of order\n");
                return 1;
            }
            front.rsp_cons++;
            done++;
        }
    }
    pthread_join(thread, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    (void)notify;
    printf("%.0f\n", items / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
    return 0;
}

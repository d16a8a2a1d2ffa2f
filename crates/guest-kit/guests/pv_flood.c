/* A hostile PV guest: floods its paravirtual channel with one kind of abuse, then
   checks that what must still work works. Kind (parameter bits 0..7), repeated
   `rounds` times (bits 8..31):
     1  the blkif request producer a ring ahead of the responses (rounds ignored):
        the backend must stop serving that ring, and the PV console must go on;
     2  a hypercall storm, cycling through: an unknown hypercall (-ENOSYS), an
        event-channel send to the block port with nothing published, an
        alloc_unbound (succeeds until the ports run out, then -EINVAL), a send whose
        argument lies outside guest memory (-EFAULT), a status of port `round`;
     3  a doorbell storm: the block port rung through the ioeventfd doorbell with
        nothing published.
   After kinds 2 and 3 a page is written and read back through the block ring. Prints
   "flood <kind> done <rounds>" (and, after kind 2, "ports <allocated>") on COM1 and
   "pv console still served" on the PV console; exits 0 when every answer was the one
   the ABI gives, else a step's code. */
#include "guest.h"
#include "xen.h"

#define PAGE_A ((u64)GUEST_HEAP)
#define PAGE_B ((u64)GUEST_HEAP + 0x1000)
#define HYPERCALL_UNKNOWN 0x7ff0
#define EVTCHNOP_status 5
#define EVTCHNOP_alloc_unbound 6
#define ENOSYS 38
#define EINVAL 22
#define EFAULT 14

static struct blk_front f;

/* A page written at `sector` and read back through two grants: 0 when it matches. */
static int round_trip(u64 sector, u32 seed)
{
    for (u32 i = 0; i < 4096; i += 4)
        *(u32 *)(PAGE_A + i) = 0x9e3779b9u * (i + seed);
    memset((void *)PAGE_B, 0, 4096);
    if (blk_io(&f, BLKIF_OP_WRITE, sector, 0, 0, 7, 1) != 0)
        return 1;
    if (blk_io(&f, BLKIF_OP_READ, sector, 1, 0, 7, 2) != 0)
        return 2;
    return memcmp((void *)PAGE_A, (void *)PAGE_B, 4096) ? 3 : 0;
}

/* `rounds` hypercalls of the five kinds above; the number of ports allocated goes to
   *ports. 0 when each answer was right. */
static int hypercall_storm(u64 rounds, u64 *ports)
{
    static struct {
        u16 dom, remote_dom;
        u32 port;
    } unbound;
    static struct {
        u16 dom;
        u16 pad;
        u32 port;
        u32 status, vcpu;
        u64 extra;
    } status;
    static u32 send_port;
    *ports = 0;
    for (u64 r = 0; r < rounds; r++) {
        long ret;
        switch (r % 5) {
        case 0:
            if (hypercall(HYPERCALL_UNKNOWN + (r & 7), r, 0, 0, 0, 0) != -ENOSYS)
                return 1;
            break;
        case 1:
            send_port = PV_BLK_PORT;
            if (hypercall(HYPERVISOR_event_channel_op, EVTCHNOP_send, (u64)&send_port, 0, 0, 0))
                return 2;
            break;
        case 2:
            unbound.dom = 0x7ff0; /* DOMID_SELF */
            unbound.remote_dom = 0;
            ret = hypercall(HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, (u64)&unbound, 0,
                            0, 0);
            if (ret == 0)
                ++*ports;
            else if (ret != -EINVAL)
                return 3;
            break;
        case 3:
            if (hypercall(HYPERVISOR_event_channel_op, EVTCHNOP_send, 0xffffffff0000ul, 0, 0, 0)
                != -EFAULT)
                return 4;
            break;
        default:
            status.dom = 0x7ff0;
            status.port = (u32)r;
            ret = hypercall(HYPERVISOR_event_channel_op, EVTCHNOP_status, (u64)&status, 0, 0, 0);
            if (ret != 0 && ret != -EINVAL)
                return 5;
            break;
        }
    }
    return 0;
}

u32 guest_main(u64 vcpu, u64 param)
{
    (void)vcpu;
    int kind = param & 0xff;
    u64 rounds = (param >> 8) & 0xffffff;
    u64 ports = 0;
    int err;
    blk_front_init(&f);
    grant_access(0, PAGE_A, 1);
    grant_access(1, PAGE_B, 0);
    if ((err = round_trip(0, 1)))
        return 10 + err;
    if (kind == 1) {
        /* Claim 1000 requests in a 32-entry ring. */
        f.h->req_prod = f.req_prod_pvt + 1000;
        mb();
        evtchn_send(PV_BLK_PORT);
    } else if (kind == 2) {
        if ((err = hypercall_storm(rounds, &ports)))
            return 20 + err;
    } else if (kind == 3) {
        for (u64 r = 0; r < rounds; r++)
            evtchn_send(PV_BLK_PORT);
    } else {
        return 2;
    }
    if (kind != 1 && (err = round_trip(8, 2)))
        return 30 + err;
    pv_console_write("pv console still served\n");
    puts_com1("flood ");
    put_hex(kind);
    puts_com1(" done ");
    put_hex(rounds);
    puts_com1("\n");
    if (kind == 2) {
        puts_com1("ports ");
        put_hex(ports);
        puts_com1("\n");
    }
    return 0;
}

/* A minimal modern virtio-pci driver for test guests (virtio 1.2 §4.1): the function
   at bus 0, device `dev`, found through ECAM; BAR 0 as the VMM placed it; memory
   decoding and bus mastering turned on (what firmware or Linux's pci_enable_device
   does); the vendor capabilities walked for the common, notification and device
   structures; MSI-X on, with every queue's events on vector 0, a message to APIC 0,
   vector 0x40. The guest runs with interrupts off, so it never takes one: the device
   pays for raising it, as it does for virtio-mmio's line. Queues use the split rings
   and kicks of virtio.h. */
#ifndef VIRTIO_PCI_H
#define VIRTIO_PCI_H
#include "virtio.h"

/* The common configuration structure (§4.1.4.3). */
#define VPCI_DEVICE_FEATURE_SELECT 0x00
#define VPCI_DEVICE_FEATURE 0x04
#define VPCI_DRIVER_FEATURE_SELECT 0x08
#define VPCI_DRIVER_FEATURE 0x0c
#define VPCI_NUM_QUEUES 0x12
#define VPCI_DEVICE_STATUS 0x14
#define VPCI_QUEUE_SELECT 0x16
#define VPCI_QUEUE_SIZE 0x18
#define VPCI_QUEUE_MSIX_VECTOR 0x1a
#define VPCI_QUEUE_ENABLE 0x1c
#define VPCI_QUEUE_NOTIFY_OFF 0x1e
#define VPCI_QUEUE_DESC 0x20
#define VPCI_QUEUE_DRIVER 0x28
#define VPCI_QUEUE_DEVICE 0x30

struct vpci {
    u64 cfg;          /* the function's ECAM configuration space */
    u64 bar0;
    u64 common;
    u64 notify;
    u32 notify_mult;
    u64 device;       /* the device-specific configuration */
    u16 num_queues;
};

static inline u64 vpci_bar_base(u64 cfg, u32 bar)
{
    u32 lo = mmio_read32(cfg + 0x10 + 4 * bar);
    u64 base = lo & ~0xful;
    if ((lo & 6) == 4)
        base |= (u64)mmio_read32(cfg + 0x14 + 4 * bar) << 32;
    return base;
}

/* Probe function `dev` on the bus whose ECAM window is at `ecam` and negotiate as
   virtio_init does (0, or a negative step number). */
static inline int vpci_init(struct vpci *p, u64 ecam, u32 dev, u32 device_id, u64 want,
                            u64 *accepted)
{
    p->cfg = ecam + ((u64)dev << 15);
    if (mmio_read32(p->cfg) != ((0x1040u + device_id) << 16 | 0x1af4))
        return -1;
    mmio_write16(p->cfg + 4, 0x6); /* memory space, bus master */
    p->bar0 = vpci_bar_base(p->cfg, 0);
    p->common = p->notify = p->device = 0;
    u32 msix = 0;
    for (u32 at = mmio_read8(p->cfg + 0x34) & 0xfc; at; at = mmio_read8(p->cfg + at + 1) & 0xfc) {
        u8 id = mmio_read8(p->cfg + at);
        if (id == 0x11) {
            msix = at;
            continue;
        }
        if (id != 9)
            continue;
        u8 type = mmio_read8(p->cfg + at + 3);
        u8 bar = mmio_read8(p->cfg + at + 4);
        u64 where = vpci_bar_base(p->cfg, bar) + mmio_read32(p->cfg + at + 8);
        if (type == 1 && !p->common)
            p->common = where;
        else if (type == 2 && !p->notify) {
            p->notify = where;
            p->notify_mult = mmio_read32(p->cfg + at + 16);
        } else if (type == 4 && !p->device)
            p->device = where;
    }
    if (!p->common || !p->notify || !msix)
        return -2;
    /* MSI-X: entry 0 to APIC 0, vector 0x40, unmasked; then enabled. */
    u32 table = mmio_read32(p->cfg + msix + 4);
    u64 entry = vpci_bar_base(p->cfg, table & 7) + (table & ~7u);
    mmio_write32(entry, 0xfee00000);
    mmio_write32(entry + 4, 0);
    mmio_write32(entry + 8, 0x40);
    mmio_write32(entry + 12, 0);
    mmio_write16(p->cfg + msix + 2, 0x8000);
    u64 c = p->common;
    mmio_write8(c + VPCI_DEVICE_STATUS, 0);
    if (mmio_read8(c + VPCI_DEVICE_STATUS) != 0)
        return -3;
    mmio_write8(c + VPCI_DEVICE_STATUS, STATUS_ACK);
    mmio_write8(c + VPCI_DEVICE_STATUS, STATUS_ACK | STATUS_DRIVER);
    mmio_write32(c + VPCI_DEVICE_FEATURE_SELECT, 0);
    u64 offered = mmio_read32(c + VPCI_DEVICE_FEATURE);
    mmio_write32(c + VPCI_DEVICE_FEATURE_SELECT, 1);
    offered |= (u64)mmio_read32(c + VPCI_DEVICE_FEATURE) << 32;
    if (!(offered & F_VERSION_1))
        return -4;
    u64 take = offered & (want | F_VERSION_1);
    mmio_write32(c + VPCI_DRIVER_FEATURE_SELECT, 0);
    mmio_write32(c + VPCI_DRIVER_FEATURE, (u32)take);
    mmio_write32(c + VPCI_DRIVER_FEATURE_SELECT, 1);
    mmio_write32(c + VPCI_DRIVER_FEATURE, (u32)(take >> 32));
    mmio_write8(c + VPCI_DEVICE_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(mmio_read8(c + VPCI_DEVICE_STATUS) & STATUS_FEATURES_OK))
        return -5;
    p->num_queues = mmio_read16(c + VPCI_NUM_QUEUES);
    *accepted = take;
    return 0;
}

/* Set up queue `index` with `size` entries in the 12 KiB at `mem`, its events on
   MSI-X vector 0. */
static inline int vpci_queue_setup(struct vpci *p, struct virtq *q, u32 index, u16 size,
                                   u64 mem, int event_idx)
{
    u64 c = p->common;
    if (index >= p->num_queues)
        return -10;
    mmio_write16(c + VPCI_QUEUE_SELECT, index);
    if (mmio_read16(c + VPCI_QUEUE_SIZE) < size)
        return -11;
    virtq_init_rings(q, index, size, mem, event_idx);
    q->mmio = 0;
    q->notify_addr = p->notify + (u64)mmio_read16(c + VPCI_QUEUE_NOTIFY_OFF) * p->notify_mult;
    mmio_write16(c + VPCI_QUEUE_SIZE, size);
    mmio_write64(c + VPCI_QUEUE_DESC, mem);
    mmio_write64(c + VPCI_QUEUE_DRIVER, mem + 4096);
    mmio_write64(c + VPCI_QUEUE_DEVICE, mem + 2 * 4096);
    mmio_write16(c + VPCI_QUEUE_MSIX_VECTOR, 0);
    if (mmio_read16(c + VPCI_QUEUE_MSIX_VECTOR) != 0)
        return -12;
    mmio_write16(c + VPCI_QUEUE_ENABLE, 1);
    if (mmio_read16(c + VPCI_QUEUE_ENABLE) != 1)
        return -13;
    return 0;
}

static inline void vpci_driver_ok(struct vpci *p)
{
    mmio_write8(p->common + VPCI_DEVICE_STATUS,
                STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}

#endif

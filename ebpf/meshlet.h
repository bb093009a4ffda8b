/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Meshlet data plane: map definitions shared by every program.
 *
 * Lookup chain of a socket call to a service:
 *
 *   frontend {vip, port, proto} -> service id
 *   service  {service id}       -> {backend count, total weight}
 *   endpoint {service id, idx}  -> backend id (+ cumulative weight, layout 2)
 *   backend  {backend id}       -> {ip, port (+ weight, locality, layout 2)}
 *
 * MESHLET_LAYOUT (1 or 2) selects the endpoint and backend value layout. The other maps have
 * layout 1 in both builds. The Rust loader (node-agent/src/dataplane/tables.rs) mirrors every
 * struct here byte for byte.
 */
#ifndef MESHLET_H
#define MESHLET_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#ifndef MESHLET_LAYOUT
#error "MESHLET_LAYOUT must be defined to 1 or 2"
#endif

#define MLT_FAMILY_V4 4
#define MLT_FAMILY_V6 6

/* Frontend key. 20 bytes. */
struct mlt_frontend_key {
	__u8 ip[16];  /* network byte order; IPv4 in ip[0..4], ip[4..16] zero */
	__u16 port;   /* network byte order */
	__u8 proto;   /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;  /* MLT_FAMILY_V4 or MLT_FAMILY_V6 */
};

/* Frontend value. */
struct mlt_frontend {
	__u32 service_id; /* host byte order */
};

/* Service value, keyed by service id (__u32, host byte order). */
struct mlt_service {
	__u32 count;        /* number of endpoints, host byte order */
	__u32 total_weight; /* sum of weights (layout 1 writes count), host byte order */
};

/* Endpoint key. */
struct mlt_endpoint_key {
	__u32 service_id; /* host byte order */
	__u32 index;      /* 0..count-1, host byte order */
};

#if MESHLET_LAYOUT == 1
struct mlt_endpoint {
	__u32 backend_id; /* host byte order */
};

/* Backend value, keyed by backend id (__u32, host byte order). 20 bytes. */
struct mlt_backend {
	__u8 ip[16];  /* network byte order; IPv4 in ip[0..4] */
	__u16 port;   /* network byte order */
	__u16 pad;
};
#elif MESHLET_LAYOUT == 2
struct mlt_endpoint {
	__u32 backend_id; /* host byte order */
	__u32 cum_weight; /* weights of endpoints 0..=index summed, host byte order */
};

/* Backend value, keyed by backend id (__u32, host byte order). 24 bytes. */
struct mlt_backend {
	__u8 ip[16];    /* network byte order; IPv4 in ip[0..4] */
	__u16 port;     /* network byte order */
	__u16 weight;   /* host byte order, >= 1 */
	__u32 locality; /* host byte order, reserved for zone-aware selection */
};
#else
#error "unknown MESHLET_LAYOUT"
#endif

/* Reverse translation key: which VIP a socket meant when it talks to a backend. 32 bytes. */
struct mlt_revnat_key {
	__u64 cookie; /* socket cookie, host byte order */
	__u8 ip[16];  /* backend, network byte order */
	__u16 port;   /* backend port, network byte order */
	__u8 family;
	__u8 pad[5];
};

struct mlt_revnat {
	__u8 ip[16]; /* VIP, network byte order */
	__u16 port;  /* VIP port, network byte order */
	__u16 pad;
};

/* Counter slots of mlt_counters (per-CPU __u64). */
#define MLT_CNT_HANDLED 0
#define MLT_CNT_REWRITTEN 1
#define MLT_CNT_NO_BACKEND 2
#define MLT_CNT_MAX 4

/* Meta slots of mlt_meta (__u32, host byte order), written only by the loader. */
#define MLT_META_SLOTS 8

/* Default capacities; the loader overrides max_entries from its configuration. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10000);
	__type(key, struct mlt_frontend_key);
	__type(value, struct mlt_frontend);
} mlt_frontend SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10000);
	__type(key, __u32);
	__type(value, struct mlt_service);
} mlt_service SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 200000);
	__type(key, struct mlt_endpoint_key);
	__type(value, struct mlt_endpoint);
} mlt_endpoint SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 200000);
	__type(key, __u32);
	__type(value, struct mlt_backend);
} mlt_backend SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct mlt_revnat_key);
	__type(value, struct mlt_revnat);
} mlt_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MLT_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} mlt_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLT_META_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} mlt_meta SEC(".maps");

#endif /* MESHLET_H */

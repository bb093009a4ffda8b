// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level service load balancing on cgroup sock_addr hooks.
 *
 * connect4/6 and sendmsg4/6 rewrite a destination that matches a frontend to a backend of
 * its service and remember {socket cookie, backend} -> VIP in mlt_revnat; getpeername4/6 and
 * recvmsg4/6 translate the backend back to the VIP so applications only ever see the VIP.
 */
#include "meshlet.h"

/* 17 halvings cover 131072 endpoints per service. */
#define MLT_SEARCH_STEPS 17

static __always_inline void count(__u32 slot)
{
	__u64 *value = bpf_map_lookup_elem(&mlt_counters, &slot);

	if (value)
		*value += 1;
}

/* Index of the endpoint to use, or -1. */
static __always_inline int pick_index(__u32 service_id, const struct mlt_service *svc)
{
	__u32 count = svc->count;

	if (count == 0)
		return -1;
#if MESHLET_LAYOUT == 1
	return bpf_get_prandom_u32() % count;
#else
	__u32 total = svc->total_weight;
	__u32 lo = 0, hi = count - 1;
	__u32 r;

	if (total == 0)
		return bpf_get_prandom_u32() % count;
	r = bpf_get_prandom_u32() % total;
	/* Smallest index whose cumulative weight exceeds r. */
	for (int i = 0; i < MLT_SEARCH_STEPS; i++) {
		struct mlt_endpoint_key key = { .service_id = service_id };
		struct mlt_endpoint *ep;
		__u32 mid;

		if (lo >= hi)
			break;
		mid = lo + (hi - lo) / 2;
		key.index = mid;
		ep = bpf_map_lookup_elem(&mlt_endpoint, &key);
		if (!ep)
			return -1;
		if (ep->cum_weight > r)
			hi = mid;
		else
			lo = mid + 1;
	}
	return lo;
#endif
}

/* try_select() result when an entry behind the frontend vanished: the loader replaced the
 * service while we looked; the frontend already names the new service id, so look again. */
#define MLT_RACED -2

/*
 * One lookup pass. Returns 1 with *out set when the destination is a service with a backend,
 * 0 when it is no service, -1 when the service has no backend, MLT_RACED when an entry behind
 * the frontend is missing.
 */
static __always_inline int try_select(const struct mlt_frontend_key *fk, struct mlt_backend *out)
{
	struct mlt_frontend *fe = bpf_map_lookup_elem(&mlt_frontend, fk);
	struct mlt_endpoint_key ek = {};
	struct mlt_endpoint *ep;
	struct mlt_service *svc;
	struct mlt_backend *be;
	int index;

	if (!fe)
		return 0;
	ek.service_id = fe->service_id;
	svc = bpf_map_lookup_elem(&mlt_service, &ek.service_id);
	if (!svc)
		return MLT_RACED;
	if (svc->count == 0)
		return -1;
	index = pick_index(ek.service_id, svc);
	if (index < 0)
		return MLT_RACED;
	ek.index = index;
	ep = bpf_map_lookup_elem(&mlt_endpoint, &ek);
	if (!ep)
		return MLT_RACED;
	be = bpf_map_lookup_elem(&mlt_backend, &ep->backend_id);
	if (!be)
		return MLT_RACED;
	__builtin_memcpy(out, be, sizeof(*out));
	return 1;
}

/* Chooses a backend for the frontend key, looking twice if an update raced the first pass. */
static __always_inline int select_backend(const struct mlt_frontend_key *fk, struct mlt_backend *out)
{
	int found = try_select(fk, out);

	if (found == MLT_RACED)
		found = try_select(fk, out);
	return found == MLT_RACED ? -1 : found;
}

static __always_inline void remember(struct bpf_sock_addr *ctx, const struct mlt_frontend_key *fk,
				     const struct mlt_backend *be)
{
	struct mlt_revnat_key rk = {};
	struct mlt_revnat rv = {};

	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.ip, be->ip, 16);
	rk.port = be->port;
	rk.family = fk->family;
	__builtin_memcpy(rv.ip, fk->ip, 16);
	rv.port = fk->port;
	bpf_map_update_elem(&mlt_revnat, &rk, &rv, BPF_ANY);
}

static __always_inline int forward4(struct bpf_sock_addr *ctx)
{
	struct mlt_frontend_key fk = {};
	struct mlt_backend be = {};
	__u32 ip4 = ctx->user_ip4;
	int found;

	count(MLT_CNT_HANDLED);
	__builtin_memcpy(fk.ip, &ip4, 4);
	fk.port = (__u16)ctx->user_port;
	fk.proto = (__u8)ctx->protocol;
	fk.family = MLT_FAMILY_V4;
	found = select_backend(&fk, &be);
	if (found == 0)
		return 1;
	if (found < 0) {
		count(MLT_CNT_NO_BACKEND);
		return 0; /* refuse: the service exists but has nowhere to go */
	}
	__builtin_memcpy(&ip4, be.ip, 4);
	ctx->user_ip4 = ip4;
	ctx->user_port = (__u32)be.port;
	remember(ctx, &fk, &be);
	count(MLT_CNT_REWRITTEN);
	return 1;
}

static __always_inline int forward6(struct bpf_sock_addr *ctx)
{
	struct mlt_frontend_key fk = {};
	struct mlt_backend be = {};
	__u32 w[4];
	int found;

	count(MLT_CNT_HANDLED);
	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	__builtin_memcpy(fk.ip, w, 16);
	fk.port = (__u16)ctx->user_port;
	fk.proto = (__u8)ctx->protocol;
	fk.family = MLT_FAMILY_V6;
	found = select_backend(&fk, &be);
	if (found == 0)
		return 1;
	if (found < 0) {
		count(MLT_CNT_NO_BACKEND);
		return 0;
	}
	__builtin_memcpy(w, be.ip, 16);
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = (__u32)be.port;
	remember(ctx, &fk, &be);
	count(MLT_CNT_REWRITTEN);
	return 1;
}

static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	struct mlt_revnat_key rk = {};
	struct mlt_revnat *rv;
	__u32 ip4 = ctx->user_ip4;

	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.ip, &ip4, 4);
	rk.port = (__u16)ctx->user_port;
	rk.family = MLT_FAMILY_V4;
	rv = bpf_map_lookup_elem(&mlt_revnat, &rk);
	if (!rv)
		return 1;
	__builtin_memcpy(&ip4, rv->ip, 4);
	ctx->user_ip4 = ip4;
	ctx->user_port = (__u32)rv->port;
	return 1;
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	struct mlt_revnat_key rk = {};
	struct mlt_revnat *rv;
	__u32 w[4];

	rk.cookie = bpf_get_socket_cookie(ctx);
	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	__builtin_memcpy(rk.ip, w, 16);
	rk.port = (__u16)ctx->user_port;
	rk.family = MLT_FAMILY_V6;
	rv = bpf_map_lookup_elem(&mlt_revnat, &rk);
	if (!rv)
		return 1;
	__builtin_memcpy(w, rv->ip, 16);
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = (__u32)rv->port;
	return 1;
}

SEC("cgroup/connect4")
int mlt_connect4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx);
}

SEC("cgroup/connect6")
int mlt_connect6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx);
}

SEC("cgroup/sendmsg4")
int mlt_sendmsg4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx);
}

SEC("cgroup/sendmsg6")
int mlt_sendmsg6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx);
}

SEC("cgroup/recvmsg4")
int mlt_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/recvmsg6")
int mlt_recvmsg6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

SEC("cgroup/getpeername4")
int mlt_peername4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/getpeername6")
int mlt_peername6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

char _license[] SEC("license") = "Dual BSD/GPL";

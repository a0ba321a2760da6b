// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
// metaguard's cgroup BPF layer: refuses connect()/sendmsg() to metadata
// endpoints and raw/packet socket creation for processes in guarded
// cgroups, whatever network namespace they are in — and, for classes a
// workload observes, lets them through and reports each one.
//
// Decisions are made in user space (metaguard-core::bpf_policy) and handed
// over in maps:
//   mg_policy  cgroup id -> { rule index, deny bits }   (configured cgroups)
//   mg_ep4     IPv4 address (network order) -> endpoint class bits
//   mg_ep6     IPv6 address (16 bytes)      -> endpoint class bits
//   mg_netns   network namespace cookie     -> { rule index, deny bits }
//              (namespaces the daemon classified; key 0: any other
//              namespace but the host's, which has its own entry)
// The programs walk the caller's cgroup and its ancestors; of the configured
// cgroups found, and the socket's network namespace, the one with the
// lowest rule index wins (first match in file order, like the nft layer).
// A namespace nobody has classified yet takes key 0's decision: unknown
// means denied. A refusal returns 0 (the kernel answers EPERM) and emits an
// event on mg_events. An observed class (observe bits: the class bit << 3)
// is allowed and emits an event flagged MG_VERDICT_OBSERVED; deny wins.
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef AF_PACKET
#define AF_PACKET 17
#endif
#ifndef SOCK_RAW
#define SOCK_RAW 3
#endif
#ifndef SOCK_PACKET
#define SOCK_PACKET 10
#endif

#define MG_CLASS_IMDS 1u
#define MG_CLASS_TASK_METADATA 2u
#define MG_DENY_RAW 4u
/* Observed classes: the class bit shifted by MG_OBSERVE_SHIFT. */
#define MG_OBSERVE_SHIFT 3
#define MG_OBSERVE_IMDS 8u
#define MG_OBSERVE_TASK_METADATA 16u
#define MG_CLASSES (MG_CLASS_IMDS | MG_CLASS_TASK_METADATA)
#define MG_LOOKED_AT \
	(MG_CLASSES | MG_OBSERVE_IMDS | MG_OBSERVE_TASK_METADATA)

#define MG_VERDICT_REFUSED 0u
#define MG_VERDICT_OBSERVED 1u

#define MG_SYSCALL_CONNECT 1u
#define MG_SYSCALL_SENDMSG 2u
#define MG_SYSCALL_SOCKET 3u

/* Sizes. A build may override them (`clang -DMG_MAX_LEVELS=16`); the lab
 * tests build such variants to stand for an older or newer metaguard: one
 * changes the programs' instructions, the other a map's definition. */
/* Deepest cgroup level looked at (the caller's own level is clamped to it). */
#ifndef MG_MAX_LEVELS
#define MG_MAX_LEVELS 32
#endif
/* Configured cgroups the policy map holds. */
#ifndef MG_POLICY_ENTRIES
#define MG_POLICY_ENTRIES 4096
#endif
/* Network namespaces the netns map holds (containers and tasks on a host). */
#ifndef MG_NETNS_ENTRIES
#define MG_NETNS_ENTRIES 16384
#endif

struct mg_decision {
	__u32 rule;
	__u32 bits;
};

struct mg_event {
	__u64 cgroup_id;
	__u32 pid;
	__u32 syscall;
	__u32 family;
	__u32 port; /* host order */
	__u8 addr[16];
	__u32 sock_type;
	__u32 protocol;
	/* Added after the first layout (48 bytes); readers accept both. */
	__u64 netns_cookie;
	__u64 sock_cookie;
	char comm[16];
	__u32 verdict; /* MG_VERDICT_* */
	__u32 rule;    /* the deciding rule index (0xffffffff: none) */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MG_POLICY_ENTRIES);
	__type(key, __u64);
	__type(value, struct mg_decision);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MG_NETNS_ENTRIES);
	__type(key, __u64);
	__type(value, struct mg_decision);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_ep4 SEC(".maps");

struct mg_ip6 {
	__u32 w[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct mg_ip6);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_ep6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mg_events SEC(".maps");

/* The bits of the first match (lowest rule index) among the caller's
 * cgroup and its ancestors and, for a socket outside the host's network
 * namespace, that namespace's decision; 0 when nothing matches. `rule`
 * gets the deciding rule index. */
static __always_inline __u32 caller_bits(__u64 netns_cookie, __u32 *rule)
{
	__u32 best_rule = 0xffffffffu;
	__u32 bits = 0;
	struct mg_decision *d;
	__u64 any = 0;
	int level;

	if (netns_cookie) {
		d = bpf_map_lookup_elem(&mg_netns, &netns_cookie);
		if (!d)
			d = bpf_map_lookup_elem(&mg_netns, &any);
		if (d) {
			best_rule = d->rule;
			bits = d->bits;
		}
	}
	for (level = 0; level < MG_MAX_LEVELS; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (id == 0)
			break;
		d = bpf_map_lookup_elem(&mg_policy, &id);
		if (d && d->rule < best_rule) {
			best_rule = d->rule;
			bits = d->bits;
		}
	}
	*rule = best_rule;
	return bits;
}

static __always_inline void emit(__u32 syscall, __u32 family, __u32 port,
				 const void *addr, __u32 len, __u32 type,
				 __u32 protocol, __u32 verdict, __u32 rule,
				 __u64 netns_cookie, __u64 sock_cookie)
{
	struct mg_event *e = bpf_ringbuf_reserve(&mg_events, sizeof(*e), 0);

	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->syscall = syscall;
	e->family = family;
	e->port = port;
	if (len == 4)
		__builtin_memcpy(e->addr, addr, 4);
	else if (len == 16)
		__builtin_memcpy(e->addr, addr, 16);
	e->sock_type = type;
	e->protocol = protocol;
	e->netns_cookie = netns_cookie;
	e->sock_cookie = sock_cookie;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->verdict = verdict;
	e->rule = rule;
	bpf_ringbuf_submit(e, 0);
}

/* The verdict for a destination of class bits `class` (none: 0): refused
 * (0), observed (an event, then allowed: 1) or untouched (1). */
static __always_inline int decide(struct bpf_sock_addr *ctx, __u32 syscall,
				  __u32 family, const void *addr, __u32 len,
				  __u32 *class, __u32 bits, __u32 rule,
				  __u64 netns_cookie)
{
	__u32 verdict;

	if (!class)
		return 1;
	if (*class & bits)
		verdict = MG_VERDICT_REFUSED;
	else if ((*class << MG_OBSERVE_SHIFT) & bits)
		verdict = MG_VERDICT_OBSERVED;
	else
		return 1;
	emit(syscall, family, __builtin_bswap16(ctx->user_port), addr, len,
	     ctx->type, ctx->protocol, verdict, rule, netns_cookie,
	     bpf_get_socket_cookie(ctx));
	return verdict == MG_VERDICT_OBSERVED;
}

static __always_inline int check4(struct bpf_sock_addr *ctx, __u32 syscall)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	__u32 rule;
	__u32 bits = caller_bits(cookie, &rule);
	__u32 ip;

	if (!(bits & MG_LOOKED_AT))
		return 1;
	ip = ctx->user_ip4;
	return decide(ctx, syscall, AF_INET, &ip, 4,
		      bpf_map_lookup_elem(&mg_ep4, &ip), bits, rule, cookie);
}

static __always_inline int check6(struct bpf_sock_addr *ctx, __u32 syscall)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	__u32 rule;
	__u32 bits = caller_bits(cookie, &rule);
	struct mg_ip6 ip;
	__u32 *class;

	if (!(bits & MG_LOOKED_AT))
		return 1;
	ip.w[0] = ctx->user_ip6[0];
	ip.w[1] = ctx->user_ip6[1];
	ip.w[2] = ctx->user_ip6[2];
	ip.w[3] = ctx->user_ip6[3];
	/* ::ffff:a.b.c.d reaches the IPv4 endpoint a.b.c.d. */
	if (ip.w[0] == 0 && ip.w[1] == 0 && ip.w[2] == __builtin_bswap32(0xffff)) {
		__u32 v4 = ip.w[3];

		class = bpf_map_lookup_elem(&mg_ep4, &v4);
	} else {
		class = bpf_map_lookup_elem(&mg_ep6, &ip);
	}
	return decide(ctx, syscall, AF_INET6, &ip, 16, class, bits, rule,
		      cookie);
}

SEC("cgroup/connect4")
int mg_connect4(struct bpf_sock_addr *ctx)
{
	return check4(ctx, MG_SYSCALL_CONNECT);
}

SEC("cgroup/connect6")
int mg_connect6(struct bpf_sock_addr *ctx)
{
	return check6(ctx, MG_SYSCALL_CONNECT);
}

SEC("cgroup/sendmsg4")
int mg_sendmsg4(struct bpf_sock_addr *ctx)
{
	return check4(ctx, MG_SYSCALL_SENDMSG);
}

SEC("cgroup/sendmsg6")
int mg_sendmsg6(struct bpf_sock_addr *ctx)
{
	return check6(ctx, MG_SYSCALL_SENDMSG);
}

SEC("cgroup/sock_create")
int mg_sock_create(struct bpf_sock *ctx)
{
	__u32 family = ctx->family, type = ctx->type, protocol = ctx->protocol;
	__u32 rule;

	if (family != AF_PACKET && type != SOCK_RAW && type != SOCK_PACKET)
		return 1;
	/* raw_sockets is a cgroups decision only (0: no namespace lookup). */
	if (!(caller_bits(0, &rule) & MG_DENY_RAW))
		return 1;
	emit(MG_SYSCALL_SOCKET, family, 0, 0, 0, type, protocol,
	     MG_VERDICT_REFUSED, rule, 0, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

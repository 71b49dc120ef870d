/* LD_PRELOAD shim of the llmop development runtime: a wildcard bind() becomes a bind to the pod IP.
 *
 * Local pods share the host's network namespace. Listeners that bind 0.0.0.0 or :: (torch's
 * TCPStore, used for the rendezvous on MASTER_PORT, is one) would then collide across pods that use
 * the same port. Binding the pod's own loopback address (LLMOP_POD_IP, e.g. 127.2.0.7) instead gives
 * every pod its own port space, as a pod network namespace would. Explicit addresses pass unchanged.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *ip = getenv("LLMOP_POD_IP");
    struct in_addr pod;
    if (!addr || !ip || inet_pton(AF_INET, ip, &pod) != 1) return real_bind(fd, addr, len);
    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in4.sin_addr = pod;
            return real_bind(fd, (const struct sockaddr *)&in4, sizeof in4);
        }
    } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr)) {
            /* ::ffff:<pod IP>: a dual-stack socket then accepts IPv4 connections to the pod IP only. */
            memset(&in6.sin6_addr, 0, sizeof in6.sin6_addr);
            in6.sin6_addr.s6_addr[10] = 0xff;
            in6.sin6_addr.s6_addr[11] = 0xff;
            memcpy(&in6.sin6_addr.s6_addr[12], &pod, 4);
            if (real_bind(fd, (const struct sockaddr *)&in6, sizeof in6) == 0) return 0;
            /* IPV6_V6ONLY sockets cannot take a mapped address: keep the caller's wildcard. */
        }
    }
    return real_bind(fd, addr, len);
}

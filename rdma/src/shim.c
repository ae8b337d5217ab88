/*
 * A thin C shim over libfabric for the Rust binding (src/sys.rs).
 *
 * Most of libfabric's calls are static inline functions in its headers, so
 * Rust cannot call them; each is wrapped here in a plain function, and
 * the few structures the binding reads (fi_info, completion entries, CM
 * events) are copied into flat ones. No policy lives here: every choice
 * (provider, sizes, keys) comes from the caller.
 */
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define DMF_VERSION FI_VERSION(1, 17)

/*
 * libfabric is loaded with dlopen on first use, not linked: Debian's build
 * links the PSM libraries, whose constructors install SIGABRT/SIGSEGV
 * handlers that print a backtrace and exit(1), which would turn the
 * binary's deliberate abort on a broken invariant into a plain exit even
 * when the fabric link is not configured. The handlers in force before the
 * load are put back after it. Only five functions are real exports; every
 * other call goes through the objects' operation tables.
 */
static int (*p_getinfo)(uint32_t, const char *, const char *, uint64_t, const struct fi_info *,
                        struct fi_info **);
static void (*p_freeinfo)(struct fi_info *);
static struct fi_info *(*p_dupinfo)(const struct fi_info *);
static int (*p_fabric)(struct fi_fabric_attr *, struct fid_fabric **, void *);
static const char *(*p_strerror)(int);
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static int loaded;
static char load_error[256];

/* Loads libfabric.so.1 once. Returns 0, or -1 with the reason in err. */
int dmf_load(char *err, size_t errlen)
{
    static const int sigs[] = {SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE};
    struct sigaction old[sizeof(sigs) / sizeof(sigs[0])];
    pthread_mutex_lock(&load_lock);
    if (!loaded) {
        for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
            sigaction(sigs[i], NULL, &old[i]);
        void *h = dlopen("libfabric.so.1", RTLD_NOW | RTLD_LOCAL);
        for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
            sigaction(sigs[i], &old[i], NULL);
        if (!h) {
            snprintf(load_error, sizeof(load_error), "%s", dlerror());
            loaded = -1;
        } else {
            p_getinfo = dlsym(h, "fi_getinfo");
            p_freeinfo = dlsym(h, "fi_freeinfo");
            p_dupinfo = dlsym(h, "fi_dupinfo");
            p_fabric = dlsym(h, "fi_fabric");
            p_strerror = dlsym(h, "fi_strerror");
            if (p_getinfo && p_freeinfo && p_dupinfo && p_fabric && p_strerror) {
                loaded = 1;
            } else {
                snprintf(load_error, sizeof(load_error), "libfabric.so.1 lacks fi_getinfo/fi_fabric");
                loaded = -1;
            }
        }
    }
    int r = loaded == 1 ? 0 : -1;
    if (r)
        snprintf(err, errlen, "%s", load_error);
    pthread_mutex_unlock(&load_lock);
    return r;
}

/* What the binding needs to know of a chosen fi_info. */
struct dmf_info_attrs {
    uint64_t mode;
    uint64_t mr_mode;
    uint64_t cq_data_size;
    uint64_t mr_key_size;
    uint64_t max_msg_size;
    uint64_t rx_size;
    uint64_t tx_size;
};

/* A completion, or an error completion (err != 0). */
struct dmf_comp {
    uint64_t context;
    uint64_t flags;
    uint64_t len;
    uint64_t data;
    int32_t err;
    int32_t prov_errno;
};

/* One EQ event. For FI_CONNREQ, info is the request's fi_info (free it with
 * dmf_info_free after dmf_endpoint/dmf_reject), data its private data. */
struct dmf_cm_event {
    uint32_t event;
    int32_t err;
    int32_t prov_errno;
    uint32_t data_len;
    struct fi_info *info;
    uint8_t data[64];
};

int dmf_getinfo(const char *prov, const char *node, const char *service, int source,
                struct fi_info **out)
{
    struct fi_info *hints = p_dupinfo(NULL);
    if (!hints)
        return -FI_ENOMEM;
    hints->ep_attr->type = FI_EP_MSG;
    hints->caps = FI_MSG | FI_RMA | FI_WRITE | FI_REMOTE_WRITE;
    /* The binding posts receives for writes carrying immediate data, as
     * verbs needs; it passes no fi_context. */
    hints->mode = FI_RX_CQ_DATA;
    hints->domain_attr->mr_mode =
        FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    hints->domain_attr->data_progress = FI_PROGRESS_MANUAL;
    hints->domain_attr->control_progress = FI_PROGRESS_MANUAL;
    hints->tx_attr->msg_order = FI_ORDER_SAS | FI_ORDER_WAW | FI_ORDER_SAW;
    hints->fabric_attr->prov_name = strdup(prov);
    int r = p_getinfo(DMF_VERSION, node, service, source ? FI_SOURCE : 0, hints, out);
    p_freeinfo(hints);
    return r;
}

void dmf_info_free(struct fi_info *info) { p_freeinfo(info); }

void dmf_info_attrs(const struct fi_info *i, struct dmf_info_attrs *a)
{
    a->mode = i->mode;
    a->mr_mode = (uint64_t)i->domain_attr->mr_mode;
    a->cq_data_size = i->domain_attr->cq_data_size;
    a->mr_key_size = i->domain_attr->mr_key_size;
    a->max_msg_size = i->ep_attr->max_msg_size;
    a->rx_size = i->rx_attr->size;
    a->tx_size = i->tx_attr->size;
}

const char *dmf_strerror(int err)
{
    return p_strerror ? p_strerror(err) : "libfabric is not loaded";
}

int dmf_fabric(struct fi_info *info, struct fid_fabric **out)
{
    return p_fabric(info->fabric_attr, out, NULL);
}

int dmf_domain(struct fid_fabric *f, struct fi_info *info, struct fid_domain **out)
{
    return fi_domain(f, info, out, NULL);
}

int dmf_eq_open(struct fid_fabric *f, struct fid_eq **out)
{
    struct fi_eq_attr attr = {0};
    attr.size = 64;
    attr.wait_obj = FI_WAIT_UNSPEC;
    return fi_eq_open(f, &attr, out, NULL);
}

int dmf_cq_open(struct fid_domain *d, size_t size, int wait_fd, struct fid_cq **out)
{
    struct fi_cq_attr attr = {0};
    attr.size = size;
    attr.format = FI_CQ_FORMAT_DATA;
    attr.wait_obj = wait_fd ? FI_WAIT_FD : FI_WAIT_NONE;
    return fi_cq_open(d, &attr, out, NULL);
}

int dmf_cq_wait_fd(struct fid_cq *cq, int *fd)
{
    return fi_control(&cq->fid, FI_GETWAIT, fd);
}

int dmf_trywait(struct fid_fabric *f, struct fid_cq *cq)
{
    struct fid *fids[1] = {&cq->fid};
    return fi_trywait(f, fids, 1);
}

int dmf_passive_ep(struct fid_fabric *f, struct fi_info *info, struct fid_eq *eq,
                   struct fid_pep **out)
{
    int r = fi_passive_ep(f, info, out, NULL);
    if (r)
        return r;
    r = fi_pep_bind(*out, &eq->fid, 0);
    if (!r)
        r = fi_listen(*out);
    if (r) {
        fi_close(&(*out)->fid);
        *out = NULL;
    }
    return r;
}

/* The bound port of a passive endpoint (IPv4 or IPv6), or a negative error. */
int dmf_pep_port(struct fid_pep *pep)
{
    struct sockaddr_storage ss;
    size_t len = sizeof(ss);
    int r = fi_getname(&pep->fid, &ss, &len);
    if (r)
        return r;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return -FI_EINVAL;
}

int dmf_endpoint(struct fid_domain *d, struct fi_info *info, struct fid_eq *eq,
                 struct fid_cq *cq, struct fid_ep **out)
{
    int r = fi_endpoint(d, info, out, NULL);
    if (r)
        return r;
    r = fi_ep_bind(*out, &eq->fid, 0);
    if (!r)
        r = fi_ep_bind(*out, &cq->fid, FI_TRANSMIT | FI_RECV);
    if (!r)
        r = fi_enable(*out);
    if (r) {
        fi_close(&(*out)->fid);
        *out = NULL;
    }
    return r;
}

int dmf_connect(struct fid_ep *ep, struct fi_info *info, const void *param, size_t len)
{
    return fi_connect(ep, info->dest_addr, param, len);
}

int dmf_accept(struct fid_ep *ep) { return fi_accept(ep, NULL, 0); }

int dmf_reject(struct fid_pep *pep, struct fi_info *req)
{
    return fi_reject(pep, req->handle, NULL, 0);
}

int dmf_shutdown(struct fid_ep *ep) { return fi_shutdown(ep, 0); }

/* Reads one EQ event, waiting up to timeout_ms (0: no wait). Returns 1 with
 * an event (or an error event, ev->err != 0), 0 when there was none, or a
 * negative error. */
int dmf_eq_read(struct fid_eq *eq, int timeout_ms, struct dmf_cm_event *ev)
{
    struct {
        struct fi_eq_cm_entry e;
        uint8_t data[64];
    } buf;
    uint32_t event = 0;
    memset(ev, 0, sizeof(*ev));
    ssize_t n = timeout_ms > 0 ? fi_eq_sread(eq, &event, &buf, sizeof(buf), timeout_ms, 0)
                               : fi_eq_read(eq, &event, &buf, sizeof(buf), 0);
    if (n == -FI_EAGAIN || n == -FI_ETIMEDOUT)
        return 0;
    if (n == -FI_EAVAIL) {
        struct fi_eq_err_entry err = {0};
        ssize_t m = fi_eq_readerr(eq, &err, 0);
        if (m < 0)
            return (int)m;
        ev->err = err.err ? err.err : FI_EOTHER;
        ev->prov_errno = err.prov_errno;
        if (err.err_data && err.err_data_size)
            free(err.err_data);
        return 1;
    }
    if (n < 0)
        return (int)n;
    ev->event = event;
    if (event == FI_CONNREQ) {
        ev->info = buf.e.info;
        size_t dl = (size_t)n > sizeof(buf.e) ? (size_t)n - sizeof(buf.e) : 0;
        if (dl > sizeof(ev->data))
            dl = sizeof(ev->data);
        memcpy(ev->data, buf.data, dl);
        ev->data_len = (uint32_t)dl;
    } else if (event == FI_CONNECTED && buf.e.info) {
        p_freeinfo(buf.e.info);
    }
    return 1;
}

int dmf_mr_reg(struct fid_domain *d, void *buf, size_t len, uint64_t access, uint64_t key,
               struct fid_mr **out, uint64_t *out_key, void **out_desc)
{
    int r = fi_mr_reg(d, buf, len, access, 0, key, 0, out, NULL);
    if (r)
        return r;
    *out_key = fi_mr_key(*out);
    *out_desc = fi_mr_desc(*out);
    return 0;
}

ssize_t dmf_writedata(struct fid_ep *ep, const void *buf, size_t len, void *desc,
                      uint64_t data, uint64_t addr, uint64_t key, uint64_t context)
{
    return fi_writedata(ep, buf, len, desc, data, 0, addr, key, (void *)(uintptr_t)context);
}

ssize_t dmf_recv(struct fid_ep *ep, void *buf, size_t len, void *desc, uint64_t context)
{
    return fi_recv(ep, buf, len, desc, 0, (void *)(uintptr_t)context);
}

/* Reads up to count completions. Returns how many, 0 when none, or -FI_EAVAIL
 * after filling out[0] with an error completion, or another negative error. */
ssize_t dmf_cq_read(struct fid_cq *cq, struct dmf_comp *out, size_t count)
{
    struct fi_cq_data_entry e[32];
    if (count > 32)
        count = 32;
    ssize_t n = fi_cq_read(cq, e, count);
    if (n == -FI_EAGAIN)
        return 0;
    if (n == -FI_EAVAIL) {
        struct fi_cq_err_entry err = {0};
        ssize_t m = fi_cq_readerr(cq, &err, 0);
        if (m < 0)
            return m;
        out[0].context = (uint64_t)(uintptr_t)err.op_context;
        out[0].flags = err.flags;
        out[0].len = err.len;
        out[0].data = err.data;
        out[0].err = err.err ? err.err : FI_EOTHER;
        out[0].prov_errno = err.prov_errno;
        return -FI_EAVAIL;
    }
    if (n < 0)
        return n;
    for (ssize_t i = 0; i < n; i++) {
        out[i].context = (uint64_t)(uintptr_t)e[i].op_context;
        out[i].flags = e[i].flags;
        out[i].len = e[i].len;
        out[i].data = e[i].data;
        out[i].err = 0;
        out[i].prov_errno = 0;
    }
    return n;
}

/* Closes any libfabric object (every fid_* begins with its struct fid). */
int dmf_close(void *obj)
{
    if (!obj)
        return 0;
    return fi_close((struct fid *)obj);
}

/* Constants the binding needs, so that Rust never restates a header value. */
uint64_t dmf_const(int which)
{
    switch (which) {
    case 0: return FI_READ;
    case 1: return FI_WRITE;
    case 2: return FI_REMOTE_READ;
    case 3: return FI_REMOTE_WRITE;
    case 4: return FI_MR_LOCAL;
    case 5: return FI_MR_VIRT_ADDR;
    case 6: return FI_MR_PROV_KEY;
    case 7: return FI_RX_CQ_DATA;
    case 8: return FI_REMOTE_CQ_DATA;
    case 9: return FI_RECV;
    case 10: return FI_CONNREQ;
    case 11: return FI_CONNECTED;
    case 12: return FI_SHUTDOWN;
    case 13: return FI_EAGAIN;
    case 14: return FI_EAVAIL;
    case 15: return FI_SEND;
    case 16: return FI_MR_ENDPOINT;
    case 17: return FI_MR_RAW;
    default: return 0;
    }
}

/* server.h -- lunad's shared state and the prototypes of its modules */
/* SPDX-License-Identifier: MIT */
/*
** Threads and lock order. One loop thread owns every connection (accept, read, parse,
** write, close, free). Worker threads own nothing but the job they run. Shared state:
**   srv.queue_mu   the work queue and its counters        (loop pushes, workers pop)
**   srv.done_mu    finished jobs waiting for the loop      (workers push, loop drains)
**   reg.mu         the model registry (registry.c)
**   C.mu           the result cache (cache.c)
** A thread never holds two of these at once. A connection is freed only by the loop,
** once no job refers to it ('refs' == 0, counted by the loop thread alone); a worker
** learns that its client went away through the job's atomic 'cancelled' flag.
*/
#ifndef LUNA_SERVER_SERVER_H
#define LUNA_SERVER_SERVER_H

#include "core/status.h"
#include "luna_proto.h"
#include "models/textenc.h"
#include "text/tokenizer.h"

#include <cJSON.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define LUNAD_VERSION "0.1.0"
#define SRV_MAX_DIRS 16
#define SRV_MAX_PRELOAD 16

/* Configuration: every field is a command-line flag and a --config key (config.c). */
typedef struct srv_config {
  const char *socket_path;            /* Unix socket path */
  unsigned socket_mode;               /* its file mode (default 0600) */
  const char *listen;                 /* HOST:PORT for TCP, or NULL */
  const char *token_file;             /* required with 'listen' */
  const char *models_dirs[SRV_MAX_DIRS];
  int n_models_dirs;
  const char *preload[SRV_MAX_PRELOAD];
  int n_preload;
  const char *tokenizer_dir;          /* for text requests; NULL: tokens only */
  uint64_t max_model_mem;             /* bytes; 0: no budget */
  uint64_t max_frame;                 /* bytes */
  uint64_t cache_mem;                 /* result cache budget in bytes; 0 disables it */
  int max_queue;                      /* queued jobs before EBUSY */
  int batch_max;                      /* encode requests run as one forward pass (1: no batching) */
  int workers;                        /* compute workers */
  int threads_per_worker;             /* ops_pool size per worker (0: one per CPU) */
  double grace_s;                     /* shutdown grace for in-flight work */
  double io_timeout_s;                /* a started frame must complete within this */
  double deadline_s;                  /* default per-request deadline (0: none) */
  int weight_f32;                     /* keep weights as fp32 instead of fp16 */
  int log_level;
  int lora_mode;                      /* SRV_LORA_AUTO, _LOCK or _FUNCTIONAL */
  const char *loras_dirs[SRV_MAX_DIRS];
  int n_loras_dirs;
  uint64_t lora_cache_mem;            /* LoRA cache budget in bytes */
  uint64_t vae_max_mem;               /* VAE work above this many bytes runs tiled ("auto") */
} srv_config;

enum { SRV_LORA_AUTO = 0, SRV_LORA_LOCK = 1, SRV_LORA_FUNCTIONAL = 2 };

struct conn;

/* One request handed to the workers. */
typedef struct job {
  struct conn *c;                     /* the client; the loop holds a ref for the job */
  atomic_int *cancelled;              /* the connection's flag, set when it goes away */
  uint16_t type;
  uint64_t request_id;
  cJSON *msg;                         /* parsed JSON part, owned */
  double received_ms, deadline_ms;    /* monotonic ms; deadline 0: none */
  uint8_t *reply;                     /* built by the worker */
  size_t reply_len;
  int failed;                         /* the reply is an error */
  char *batch_key;                    /* encode jobs with equal keys may share a forward pass */
  uint8_t *bin;                       /* the frame's binary part (uploads, VAE tensors, embeds), owned */
  size_t bin_len;
  int is_note;                        /* a progress frame for 'c', not a job: no ref, no stats */
  struct job *next;
} job;

typedef struct srv_stats {
  atomic_uint_fast64_t served, failed, busy, expired, dropped;
} srv_stats;

typedef struct server {
  srv_config cfg;
  char *token;                        /* TCP token, or NULL */
  size_t token_len;
  tok_vocab *vocab;                   /* from --tokenizer, or NULL */
  double start_ms;
  atomic_int stopping;                /* SIGTERM/SIGINT received */
  /* work queue */
  pthread_mutex_t queue_mu;
  pthread_cond_t queue_cv;
  job *queue_head, *queue_tail;
  int queue_depth;
  int in_flight;                      /* jobs popped and not yet finished */
  /* finished jobs */
  pthread_mutex_t done_mu;
  job *done_head, *done_tail;
  int wake_fd;                        /* eventfd the workers write to wake the loop */
  srv_stats stats;                    /* atomics: no lock */
  atomic_int n_conns;
  atomic_int preloads_pending;        /* --preload models not yet loaded (or failed) */
  pthread_t *worker_threads;
  int n_workers;
} server;

extern server srv;

/* config.c -- flags, --config files, --help */
int config_parse_args(srv_config *cfg, int argc, char **argv, char *err);
void config_usage(FILE *f);
void config_free(void);              /* strings read from --config files */

/* loop.c -- listeners, connections, frames, the epoll loop */
int loop_run(char *err);
/* loop_finish frees what finished after loop_run returned (call it after work_stop). */
void loop_finish(void);

/* work.c -- the queue and the compute workers */
int work_start(char *err);
void work_stop(void);
/* work_submit queues 'j'; returns 0, LUNA_EBUSY when the queue is full or
** LUNA_ESHUTDOWN when stopping (the caller keeps 'j' then). */
int work_submit(job *j);
/* work_note hands the loop a frame to send to 'j's client before 'j' finishes (progress);
** 'frame' (malloc'd) is owned by the callee. Dropped when out of memory. */
void work_note(job *j, uint8_t *frame, size_t len);
/* work_take_done moves the finished jobs to the caller (a list linked by 'next'). */
job *work_take_done(void);
int work_idle(void);                  /* nothing queued or running */

/* registry.c -- loaded models: identity, path rules, loading, memory budget */
typedef struct model model;
typedef enum model_kind { MODEL_TEXT = 0, MODEL_VAE = 1 } model_kind;
struct vae;
int registry_init(char *err);
void registry_free(void);
/* registry_acquire resolves the relative paths in 'spec' (a JSON string or array),
** loads the model on first use (waiting if another thread is loading it) and returns
** it with a reference held. */
int registry_acquire(const cJSON *spec, model **out, char *err);
/* registry_acquire_kind: the same for a kind: the text encoders or the VAE of the files. */
int registry_acquire_kind(const cJSON *spec, model_kind kind, model **out, char *err);
const struct vae *model_vae(const model *m);
void registry_release(model *m);
const te_set *model_set(const model *m);
const char *model_id(const model *m);
const char *model_key(const model *m);  /* identity: resolved paths, sizes, mtimes */
void registry_count_requests(model *m, int n); /* for status: encodes served by 'm' */
/* registry_unload drops the model of that kind named by 'spec' once idle. */
int registry_unload(const cJSON *spec, model_kind kind, char *err);
/* JSON array of the models (for health, status and models list); 'ready' gets 0 when
** a model is loading. */
cJSON *registry_describe(int *all_ready);
/* The entry of registry_describe for 'm', which the caller holds (its reference is not
** counted in "in_use"). */
cJSON *registry_describe_model(const model *m);
uint64_t registry_weight_bytes(void);

/* srv_resolve_path resolves a client-supplied relative path inside one of 'dirs' (the
** realpaths of the folders given with 'flag'): no absolute paths, no '..', symlinks
** may not lead out of the folders, a regular file. '*out' is malloc'd. */
struct stat;
int srv_resolve_path(const char *what, char *const *dirs, int n_dirs, const char *flag, const char *rel,
                     char **out, struct stat *sb, char *err);
/* The model's LoRA merge slot (lexec.c), created with the model. */
struct lexec_slot *model_lora_slot(const model *m);
/* registry_checksums: a JSON object {"l": crc32, "g": crc32} of the model's weights as held in memory. */
cJSON *registry_checksums(const model *m);

/* lcache.c -- the content-addressed LoRA cache (lcache_) */
#include "lora/lora.h"
typedef struct lcache_entry lcache_entry;
int lcache_init(char *err);
void lcache_free(void);
/* lcache_get returns the entry of 'id' with a reference held, or NULL (a miss). */
lcache_entry *lcache_get(const uint8_t id[LORA_ID_LEN]);
/* lcache_load reads 'rel' from --loras-dir; its identity must be 'id'. On success the
** entry is held. LUNA_ENOTFOUND when there is no such file or it is another LoRA. */
int lcache_load(const char *rel, const uint8_t id[LORA_ID_LEN], lcache_entry **out, char *err);
/* lcache_put parses an uploaded image; 'claimed' must be its identity. Returns the held entry. */
int lcache_put(const uint8_t *buf, size_t len, const uint8_t claimed[LORA_ID_LEN], lcache_entry **out, char *err);
void lcache_release(lcache_entry *e);
const lora_file *lcache_file(const lcache_entry *e);
/* evict (deferred while in use), pin and unpin by id: LUNA_ENOTFOUND when unknown */
int lcache_evict(const uint8_t id[LORA_ID_LEN], int *deferred);
int lcache_pin(const uint8_t id[LORA_ID_LEN], int pin);
cJSON *lcache_list(void);
cJSON *lcache_describe(void);             /* counters for status */

/* lexec.c -- LoRA execution modes: lock, functional, auto (lexec_) */
#include "lora/lora_plan.h"
#define LEXEC_MAX_STACK 16
/* A request's LoRA stack, resolved to held cache entries, in stack order. */
typedef struct lexec_stack {
  lcache_entry *e[LEXEC_MAX_STACK];
  double strength[LEXEC_MAX_STACK];
  int n;
  char *key;            /* canonical "id:strength;..." ("" without LoRA), malloc'd */
} lexec_stack;
/* lexec_stack_key fills 'key' from the entries; LUNA_ENOMEM on failure. */
int lexec_stack_key(lexec_stack *s);
void lexec_stack_clear(lexec_stack *s);   /* releases the entries, frees the key */
/* What became of one request. */
typedef struct lexec_result {
  int rc;
  char err[LUNA_ERR_LEN];
  const char *mode;     /* "lock", "functional" or "merged"; NULL without LoRA */
  lora_report rep;
} lexec_result;
/* lexec_encode runs 'n' encode requests of model 'm' (their tokens in 'tr', their stacks
** in 'st') in the daemon's --lora-mode and fills out[i] and res[i] for each. */
void lexec_encode(model *m, struct ops_pool *pool, const te_request *tr, const lexec_stack *st, int n,
                  te_output *out, lexec_result *res);
struct lexec_slot *lexec_slot_new(void);
void lexec_slot_free(struct lexec_slot *s);
const char *lexec_mode_name(int mode);
cJSON *lexec_describe(void);              /* counters for status */

/* cache.c -- the result cache (rcache_) */
/* rcache_key returns the malloc'd exact key of an encode, or NULL when out of memory.
** 'el' and 'eg' are the request's input embeddings per encoder (NULL: none). */
uint8_t *rcache_key(const char *model_key, int clip_layer, const tok_chunks *l, const tok_chunks *g,
                   const te_embeds *el, const te_embeds *eg, size_t *len);
/* rcache_get copies a cached result into '*out' and returns 1 on a hit, 0 on a miss. */
int rcache_get(const uint8_t *key, size_t len, te_output *out);
void rcache_put(const uint8_t *key, size_t len, const te_output *out);
cJSON *rcache_describe(void);
void rcache_free(void);

/* dispatch.c -- what each message does */
/* dispatch_inline answers the cheap messages on the loop thread; returns 1 and a
** reply when it did, 0 when the job must go to a worker. */
int dispatch_inline(struct conn *c, job *j);
/* dispatch_run runs 'j' on a worker with its compute pool 'pool'. */
struct ops_pool;
void dispatch_run(job *j, struct ops_pool *pool);
/* dispatch_run_batch runs jobs with one batch key together (encode: one forward pass). */
void dispatch_run_batch(job **jobs, int n, struct ops_pool *pool);
/* dispatch_batch_key: malloc'd key of jobs that may be batched with 'j', or NULL. */
char *dispatch_batch_key(const job *j);

double srv_now_ms(void);
double srv_rss_bytes(void);

#endif

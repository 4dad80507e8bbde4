/* registry.c -- lunad's loaded models: path rules, identity, load on first use, memory budget */
/* SPDX-License-Identifier: MIT */
#include "server/server.h"

#include "core/log.h"
#include "models/vae.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_FILES 4

typedef enum { M_LOADING, M_READY, M_FAILED } model_state;

struct model {
  char *id;                       /* the relative paths as first requested, '+'-joined */
  char *key;                      /* identity: sorted "realpath|size|mtime" lines */
  char *paths[MAX_FILES];         /* resolved absolute paths, in request order */
  int n_paths;
  model_kind kind;                /* text encoders or VAE: a checkpoint holds both, loaded apart */
  te_set *set;                    /* MODEL_TEXT */
  vae *vae;                       /* MODEL_VAE */
  struct lexec_slot *slot;        /* its LoRA merge slot (lexec.c) */
  model_state state;
  char error[LUNA_ERR_LEN];
  int refs;                       /* requests using it */
  int unload_pending;
  double last_used_ms;
  uint64_t requests;
  struct model *next;
};

static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;              /* a load finished */
  model *head;
  char *dirs[SRV_MAX_DIRS];       /* realpath of each --models-dir */
  int n_dirs;
} reg = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, {0}, 0};

int registry_init(char *err) {
  for (int i = 0; i < srv.cfg.n_models_dirs; i++) {
    char *r = realpath(srv.cfg.models_dirs[i], NULL);
    struct stat sb;
    if (!r || stat(r, &sb) || !S_ISDIR(sb.st_mode)) {
      int e = errno;
      free(r);
      return luna_fail(err, LUNA_EIO, "--models-dir %s: %s", srv.cfg.models_dirs[i], r ? "not a folder" : strerror(e));
    }
    reg.dirs[reg.n_dirs++] = r;
  }
  return 0;
}

static void model_free(model *m) {
  if (!m) return;
  lexec_slot_free(m->slot);
  te_set_free(m->set);
  vae_free(m->vae);
  for (int i = 0; i < m->n_paths; i++) free(m->paths[i]);
  free(m->id);
  free(m->key);
  free(m);
}

void registry_free(void) {
  pthread_mutex_lock(&reg.mu);
  model *m = reg.head;
  reg.head = NULL;
  pthread_mutex_unlock(&reg.mu);
  while (m) {
    model *n = m->next;
    model_free(m);
    m = n;
  }
  for (int i = 0; i < reg.n_dirs; i++) free(reg.dirs[i]);
  reg.n_dirs = 0;
}

/* Resolve one client-supplied path: relative, no '..', inside one of 'dirs' after
** following symlinks, a regular file. 'what' names the kind of file in messages. */
int srv_resolve_path(const char *what, char *const *dirs, int n_dirs, const char *flag, const char *rel,
                     char **out, struct stat *sb, char *err) {
  *out = NULL;
  size_t n = strlen(rel);
  if (!n || n > 1024) return luna_fail(err, LUNA_EINVAL, "%s path is empty or longer than 1024 bytes", what);
  if (rel[0] == '/')
    return luna_fail(err, LUNA_EACCES, "%s path '%s' is absolute; name it relative to a %s folder", what, rel, flag);
  for (const char *p = rel; *p;) {
    const char *s = strchr(p, '/');
    size_t len = s ? (size_t)(s - p) : strlen(p);
    if (len == 2 && p[0] == '.' && p[1] == '.')
      return luna_fail(err, LUNA_EACCES, "%s path '%s' contains '..'", what, rel);
    p += len + (s ? 1 : 0);
    if (!s) break;
  }
  if (!n_dirs) return luna_fail(err, LUNA_ENOTFOUND, "%s '%s': this daemon has no %s", what, rel, flag);
  for (int i = 0; i < n_dirs; i++) {
    char joined[PATH_MAX];
    if ((size_t)snprintf(joined, sizeof joined, "%s/%s", dirs[i], rel) >= sizeof joined) continue;
    char *r = realpath(joined, NULL);
    if (!r) continue;
    /* a symlink may lead into any of the folders, but never out of them all */
    int inside = 0;
    for (int k = 0; k < n_dirs && !inside; k++) {
      size_t dl = strlen(dirs[k]);
      inside = !strncmp(r, dirs[k], dl) && r[dl] == '/';
    }
    if (!inside) {
      free(r);
      return luna_fail(err, LUNA_EACCES, "%s path '%s' resolves outside the %s folders", what, rel, flag);
    }
    if (stat(r, sb) || !S_ISREG(sb->st_mode)) {
      free(r);
      return luna_fail(err, LUNA_ENOTFOUND, "%s path '%s' is not a regular file", what, rel);
    }
    *out = r;
    return 0;
  }
  return luna_fail(err, LUNA_ENOTFOUND, "%s '%s' not found in any %s folder", what, rel, flag);
}

static int resolve(const char *rel, char **out, struct stat *sb, char *err) {
  return srv_resolve_path("model", reg.dirs, reg.n_dirs, "--models-dir", rel, out, sb, err);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Parse 'spec' (string or array of strings; a string may join files with '+'). */
static int spec_paths(const cJSON *spec, const char *rel[MAX_FILES], int *n, char *buf, size_t cap, char *err) {
  *n = 0;
  if (cJSON_IsString(spec)) {
    if (strlen(spec->valuestring) >= cap) return luna_fail(err, LUNA_EINVAL, "\"model\" is too long");
    strcpy(buf, spec->valuestring);
    for (char *p = buf, *s; p; p = s) {
      s = strchr(p, '+');
      if (s) *s++ = 0;
      if (*n == MAX_FILES) return luna_fail(err, LUNA_EINVAL, "\"model\" names more than %d files", MAX_FILES);
      rel[(*n)++] = p;
    }
    return 0;
  }
  if (cJSON_IsArray(spec) && cJSON_GetArraySize(spec) >= 1 && cJSON_GetArraySize(spec) <= MAX_FILES) {
    for (const cJSON *e = spec->child; e; e = e->next) {
      if (!cJSON_IsString(e)) return luna_fail(err, LUNA_EINVAL, "\"model\" array must hold strings");
      rel[(*n)++] = e->valuestring;
    }
    return 0;
  }
  return luna_fail(err, LUNA_EINVAL, "\"model\" must be a path or an array of 1 to %d paths", MAX_FILES);
}

/* Identity and resolved paths of a spec. */
static int spec_identity(const cJSON *spec, char *paths[MAX_FILES], int *n, char **key, char **id, char *err) {
  const char *rel[MAX_FILES];
  char buf[4200];
  int rc = spec_paths(spec, rel, n, buf, sizeof buf, err);
  if (rc) return rc;
  char *lines[MAX_FILES] = {0};
  size_t klen = 1, ilen = 1;
  for (int i = 0; i < *n && !rc; i++) {
    struct stat sb;
    paths[i] = NULL;
    rc = resolve(rel[i], &paths[i], &sb, err);
    if (!rc && asprintf(&lines[i], "%s|%lld|%lld.%09ld", paths[i], (long long)sb.st_size,
                        (long long)sb.st_mtim.tv_sec, sb.st_mtim.tv_nsec) < 0) {
      lines[i] = NULL;
      rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
    }
    if (!rc) klen += strlen(lines[i]) + 1, ilen += strlen(rel[i]) + 1;
  }
  if (!rc) {
    qsort(lines, (size_t)*n, sizeof *lines, cmp_str);
    *key = calloc(1, klen);
    *id = calloc(1, ilen);
    if (!*key || !*id) rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
    for (int i = 0; !rc && i < *n; i++) {
      strcat(*key, lines[i]);
      strcat(*key, "\n");
      if (i) strcat(*id, "+");
      strcat(*id, rel[i]);
    }
  }
  for (int i = 0; i < MAX_FILES; i++) free(lines[i]);
  if (rc) {
    for (int i = 0; i < *n; i++) free(paths[i]), paths[i] = NULL;
    free(*key), free(*id);
    *key = *id = NULL;
  }
  return rc;
}

static void identity_free(char *paths[MAX_FILES], int n, char *key, char *id) {
  for (int i = 0; i < n; i++) free(paths[i]);
  free(key);
  free(id);
}

static uint64_t weight_bytes(const model *m) {
  return m->kind == MODEL_VAE ? vae_weight_bytes(m->vae) : te_set_weight_bytes(m->set);
}

/* Unload idle models, least recently used first, while over the budget. Called with
** reg.mu held; the models are freed after it is released ('*freed' list). */
static void enforce_budget(model **freed) {
  uint64_t budget = srv.cfg.max_model_mem;
  for (;;) {
    uint64_t total = 0;
    model *victim = NULL;
    for (model *m = reg.head; m; m = m->next) {
      if (m->state != M_READY) continue;
      total += weight_bytes(m);
      if (!m->refs && (!victim || m->last_used_ms < victim->last_used_ms)) victim = m;
    }
    int over = budget && total > budget;
    model *pend = NULL;
    for (model *m = reg.head; m; m = m->next)
      if (m->unload_pending && !m->refs && m->state != M_LOADING) pend = m;
    if (pend) victim = pend;
    else if (!over || !victim) return;
    for (model **pp = &reg.head; *pp; pp = &(*pp)->next)
      if (*pp == victim) {
        *pp = victim->next;
        break;
      }
    log_info("unloading model %s (%s)", victim->id, pend ? "requested" : "over --max-model-mem");
    victim->next = *freed;
    *freed = victim;
  }
}

static void free_list(model *m) {
  while (m) {
    model *n = m->next;
    model_free(m);
    m = n;
  }
}

int registry_acquire(const cJSON *spec, model **out, char *err) {
  return registry_acquire_kind(spec, MODEL_TEXT, out, err);
}

/* The identity of a VAE is its files' identity with a "vae" line in front. */
static int kind_key(model_kind kind, char **key, char *err) {
  if (kind != MODEL_VAE) return 0;
  char *k = NULL;
  if (asprintf(&k, "vae\n%s", *key) < 0) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  free(*key);
  *key = k;
  return 0;
}

int registry_acquire_kind(const cJSON *spec, model_kind kind, model **out, char *err) {
  *out = NULL;
  char *paths[MAX_FILES] = {0}, *key = NULL, *id = NULL;
  int n = 0;
  int rc = spec_identity(spec, paths, &n, &key, &id, err);
  if (!rc && kind == MODEL_VAE && n != 1) rc = luna_fail(err, LUNA_EINVAL, "a VAE is one file (a checkpoint or a VAE file), not %d", n);
  if (!rc) rc = kind_key(kind, &key, err);
  if (rc) {
    identity_free(paths, n, key, id);
    return rc;
  }
  pthread_mutex_lock(&reg.mu);
  model *m;
  for (m = reg.head; m; m = m->next)
    if (!strcmp(m->key, key) && !m->unload_pending) break;
  if (m) {
    model *freed = NULL;
    m->refs++;
    while (m->state == M_LOADING) pthread_cond_wait(&reg.cv, &reg.mu);
    if (m->state == M_FAILED) {
      rc = luna_fail(err, LUNA_EMODEL, "%s", m->error);
      m->refs--;
      enforce_budget(&freed); /* the last waiter lets the failed entry go */
    } else {
      m->last_used_ms = srv_now_ms();
      *out = m;
    }
    pthread_mutex_unlock(&reg.mu);
    free_list(freed);
    identity_free(paths, n, key, id);
    return rc;
  }
  m = calloc(1, sizeof *m);
  if (m && !(m->slot = lexec_slot_new())) {
    free(m);
    m = NULL;
  }
  if (!m) {
    pthread_mutex_unlock(&reg.mu);
    identity_free(paths, n, key, id);
    return luna_fail(err, LUNA_ENOMEM, "out of memory");
  }
  m->key = key;
  m->id = id;
  m->kind = kind;
  m->n_paths = n;
  memcpy(m->paths, paths, sizeof paths);
  m->state = M_LOADING;
  m->refs = 1;
  m->next = reg.head;
  reg.head = m;
  pthread_mutex_unlock(&reg.mu);

  /* load outside the lock: other models stay usable meanwhile */
  log_info("loading %s %s", kind == MODEL_VAE ? "VAE" : "model", m->id);
  double t0 = srv_now_ms();
  te_set *set = NULL;
  vae *v = NULL;
  char lerr[LUNA_ERR_LEN] = "";
  int lrc = kind == MODEL_VAE ? vae_load(m->paths[0], &v, lerr)
                              : te_set_load((const char *const *)m->paths, m->n_paths,
                                            srv.cfg.weight_f32 ? OPS_W_F32 : OPS_W_F16, &set, lerr);
  model *freed = NULL;
  pthread_mutex_lock(&reg.mu);
  if (lrc) {
    m->state = M_FAILED;
    snprintf(m->error, sizeof m->error, "%s", lerr);
    m->refs--;
    rc = luna_fail(err, lrc, "%s", lerr);
    /* a failed entry is dropped so that a fixed file can be retried */
    for (model **pp = &reg.head; *pp; pp = &(*pp)->next)
      if (*pp == m) {
        *pp = m->next;
        break;
      }
    if (m->refs == 0) {
      m->next = freed;
      freed = m;
    } else {
      m->unload_pending = 1; /* waiters still look at it: keep it listed until they leave */
      m->next = reg.head;
      reg.head = m;
    }
  } else {
    m->set = set;
    m->vae = v;
    m->state = M_READY;
    m->last_used_ms = srv_now_ms();
    *out = m;
    enforce_budget(&freed);
  }
  /* logged under the lock: once it is released, the last waiter may free a failed entry */
  if (lrc) log_error("loading %s %s failed: %s", kind == MODEL_VAE ? "VAE" : "model", m->id, lerr);
  pthread_cond_broadcast(&reg.cv);
  pthread_mutex_unlock(&reg.mu);
  if (!lrc && kind == MODEL_VAE) /* a ready m is held by our reference */
    log_info("VAE %s ready: %d latent channels, %.1f MiB of weights, %.0f ms", m->id,
             vae_get_hparams(v)->latent_channels, (double)vae_weight_bytes(v) / (1024.0 * 1024.0), srv_now_ms() - t0);
  else if (!lrc)
    log_info("model %s ready: %s, %.1f MiB of weights, %.0f ms", m->id, te_family_name(te_set_family(set)),
             (double)te_set_weight_bytes(set) / (1024.0 * 1024.0), srv_now_ms() - t0);
  free_list(freed);
  return rc;
}

void registry_release(model *m) {
  if (!m) return;
  model *freed = NULL;
  pthread_mutex_lock(&reg.mu);
  m->refs--;
  m->last_used_ms = srv_now_ms();
  enforce_budget(&freed);
  pthread_mutex_unlock(&reg.mu);
  free_list(freed);
}

const te_set *model_set(const model *m) { return m->set; }
const vae *model_vae(const model *m) { return m->vae; }
struct lexec_slot *model_lora_slot(const model *m) { return m->slot; }

cJSON *registry_checksums(const model *m) {
  cJSON *o = cJSON_CreateObject();
  if (m->kind == MODEL_VAE) return o;
  static const char *const names[2] = {"l", "g"};
  for (int k = 0; k < 2; k++) {
    const clip_text *e = te_set_encoder(m->set, (clip_kind)k);
    if (e) cJSON_AddNumberToObject(o, names[k], (double)clip_text_checksum(e));
  }
  return o;
}
const char *model_id(const model *m) { return m->id; }
const char *model_key(const model *m) { return m->key; }

void registry_count_requests(model *m, int n) {
  pthread_mutex_lock(&reg.mu);
  m->requests += (uint64_t)n;
  pthread_mutex_unlock(&reg.mu);
}

int registry_unload(const cJSON *spec, model_kind kind, char *err) {
  char *paths[MAX_FILES] = {0}, *key = NULL, *id = NULL;
  int n = 0;
  int rc = spec_identity(spec, paths, &n, &key, &id, err);
  if (!rc) rc = kind_key(kind, &key, err);
  if (rc) {
    identity_free(paths, n, key, id);
    return rc;
  }
  model *freed = NULL;
  pthread_mutex_lock(&reg.mu);
  model *m;
  for (m = reg.head; m; m = m->next)
    if (!strcmp(m->key, key)) break;
  if (!m) rc = luna_fail(err, LUNA_ENOTFOUND, "%s '%s' is not loaded", kind == MODEL_VAE ? "VAE" : "model", id);
  else {
    m->unload_pending = 1;
    enforce_budget(&freed);
  }
  pthread_mutex_unlock(&reg.mu);
  free_list(freed);
  identity_free(paths, n, key, id);
  return rc;
}

/* One model's entry of registry_describe, with reg.mu held; 'own' references (the
** caller's) are left out of "in_use". */
static cJSON *describe(const model *m, int own) {
  cJSON *o = cJSON_CreateObject();
  if (!o) return NULL;
  cJSON_AddStringToObject(o, "id", m->id);
  cJSON *files = cJSON_AddArrayToObject(o, "files");
  for (int i = 0; i < m->n_paths; i++) {
    const char *base = strrchr(m->paths[i], '/');
    cJSON_AddItemToArray(files, cJSON_CreateString(base ? base + 1 : m->paths[i]));
  }
  const char *st = m->state == M_LOADING ? "loading" : m->state == M_READY ? "ready" : "failed";
  cJSON_AddStringToObject(o, "state", st);
  if (m->state == M_FAILED) cJSON_AddStringToObject(o, "error", m->error);
  cJSON_AddStringToObject(o, "kind", m->kind == MODEL_VAE ? "vae" : "text");
  if (m->state == M_READY && m->kind == MODEL_VAE) {
    cJSON_AddNumberToObject(o, "latent_channels", vae_get_hparams(m->vae)->latent_channels);
    cJSON_AddNumberToObject(o, "weights_bytes", (double)vae_weight_bytes(m->vae));
  } else if (m->state == M_READY) {
    cJSON_AddStringToObject(o, "family", te_family_name(te_set_family(m->set)));
    cJSON_AddNumberToObject(o, "weights_bytes", (double)te_set_weight_bytes(m->set));
  }
  cJSON_AddNumberToObject(o, "requests", (double)m->requests);
  cJSON_AddNumberToObject(o, "in_use", m->refs - own);
  if (m->unload_pending) cJSON_AddBoolToObject(o, "unload_pending", 1);
  return o;
}

cJSON *registry_describe(int *all_ready) {
  cJSON *arr = cJSON_CreateArray();
  *all_ready = 1;
  pthread_mutex_lock(&reg.mu);
  for (model *m = reg.head; m && arr; m = m->next) {
    cJSON *o = describe(m, 0);
    if (!o) break;
    if (m->state == M_LOADING) *all_ready = 0;
    cJSON_AddItemToArray(arr, o);
  }
  pthread_mutex_unlock(&reg.mu);
  return arr;
}

cJSON *registry_describe_model(const model *m) {
  pthread_mutex_lock(&reg.mu);
  cJSON *o = describe(m, 1);
  pthread_mutex_unlock(&reg.mu);
  return o;
}

uint64_t registry_weight_bytes(void) {
  uint64_t b = 0;
  pthread_mutex_lock(&reg.mu);
  for (model *m = reg.head; m; m = m->next)
    if (m->state == M_READY) b += weight_bytes(m);
  pthread_mutex_unlock(&reg.mu);
  return b;
}

/* work.c -- lunad's bounded work queue and its compute workers (each with its own ops pool) */
/* SPDX-License-Identifier: MIT */
#include "server/server.h"

#include "core/log.h"
#include "ops/ops.h"
#include "proto/frame.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* Scratch each worker's pool reserves: enough for any CLIP text encoder (MLP up to 8192). */
#define WORKER_SCRATCH_COLS 8192

static int queue_stop;

static void finish(job *j) {
  pthread_mutex_lock(&srv.done_mu);
  j->next = NULL;
  if (srv.done_tail) srv.done_tail->next = j;
  else srv.done_head = j;
  srv.done_tail = j;
  pthread_mutex_unlock(&srv.done_mu);
  uint64_t one = 1;
  ssize_t w = write(srv.wake_fd, &one, sizeof one);
  (void)w; /* the counter saturating still wakes the loop */
}

void work_note(job *j, uint8_t *frame, size_t len) {
  job *n = calloc(1, sizeof *n);
  if (!n) {
    free(frame);
    return;
  }
  n->c = j->c;
  n->is_note = 1;
  n->reply = frame;
  n->reply_len = len;
  finish(n);
}

/* Drop a job that should not run: its client left, or its deadline passed. Returns 1
** when the job was settled (a reply built or nothing to send). */
static int settle_early(job *j) {
  if (atomic_load(j->cancelled)) {
    atomic_fetch_add(&srv.stats.dropped, 1);
    return 1;
  }
  if (j->deadline_ms > 0 && srv_now_ms() > j->deadline_ms) {
    atomic_fetch_add(&srv.stats.expired, 1);
    char msg[160];
    snprintf(msg, sizeof msg, "the request waited %.0f ms in the queue, past its deadline",
             srv_now_ms() - j->received_ms);
    frame_build_error(j->type, j->request_id, LUNA_ETIMEDOUT, msg, &j->reply, &j->reply_len);
    j->failed = 1;
    return 1;
  }
  return 0;
}

static void *worker_main(void *arg) {
  int id = (int)(intptr_t)arg;
  size_t scratch = ops_linear_scratch(WORKER_SCRATCH_COLS);
  if (scratch < 77 * 77) scratch = 77 * 77;
  ops_pool *pool = ops_pool_create(srv.cfg.threads_per_worker, scratch);
  if (!pool) log_error("worker %d: cannot start its compute threads; it serves nothing", id);
  job **batch = calloc((size_t)srv.cfg.batch_max, sizeof *batch);
  job **live_jobs = calloc((size_t)srv.cfg.batch_max, sizeof *live_jobs);
  if (!live_jobs) {
    free(batch);
    batch = NULL;
  }
  job *live_one[1];
  if (!batch) live_jobs = live_one;
  for (;;) {
    /* take the oldest job, and queued jobs that can share its forward pass */
    pthread_mutex_lock(&srv.queue_mu);
    while (!srv.queue_head && !queue_stop) pthread_cond_wait(&srv.queue_cv, &srv.queue_mu);
    if (!srv.queue_head && queue_stop) {
      pthread_mutex_unlock(&srv.queue_mu);
      break;
    }
    int n = 0;
    job *first = srv.queue_head;
    for (job **pp = &srv.queue_head, *prev = NULL; *pp && n < (batch ? srv.cfg.batch_max : 1);) {
      job *j = *pp;
      int take = j == first || (first->batch_key && j->batch_key && !strcmp(j->batch_key, first->batch_key));
      if (!take) {
        prev = j;
        pp = &j->next;
        continue;
      }
      *pp = j->next;
      if (srv.queue_tail == j) srv.queue_tail = prev;
      srv.queue_depth--;
      srv.in_flight++;
      if (batch) batch[n++] = j;
      else {
        n = 1;
        first = j;
      }
    }
    pthread_mutex_unlock(&srv.queue_mu);

    job *single[1] = {first};
    job **taken = batch ? batch : single;
    int live = 0;
    for (int i = 0; i < n; i++)
      if (!settle_early(taken[i])) live_jobs[live++] = taken[i];
    if (live && !pool) {
      for (int i = 0; i < live; i++) {
        frame_build_error(live_jobs[i]->type, live_jobs[i]->request_id, LUNA_EINTERNAL,
                          "worker has no compute threads", &live_jobs[i]->reply, &live_jobs[i]->reply_len);
        live_jobs[i]->failed = 1;
      }
    } else if (live) {
      if (live > 1) log_debug("worker %d: %d requests in one batch", id, live);
      dispatch_run_batch(live_jobs, live, pool);
    }
    /* every taken job goes back to the loop, settled or not, before it stops counting
    ** as in flight (work_idle must never see a job nowhere) */
    for (int i = 0; i < n; i++) finish(taken[i]);
    pthread_mutex_lock(&srv.queue_mu);
    srv.in_flight -= n;
    pthread_mutex_unlock(&srv.queue_mu);
  }
  if (batch) free(live_jobs);
  free(batch);
  ops_pool_free(pool);
  return NULL;
}

int work_start(char *err) {
  srv.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (srv.wake_fd < 0) return luna_fail(err, LUNA_EIO, "eventfd failed");
  srv.worker_threads = calloc((size_t)srv.cfg.workers, sizeof(pthread_t));
  if (!srv.worker_threads) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  for (int i = 0; i < srv.cfg.workers; i++) {
    if (pthread_create(&srv.worker_threads[i], NULL, worker_main, (void *)(intptr_t)i))
      return luna_fail(err, LUNA_EINTERNAL, "cannot start worker %d", i);
    srv.n_workers++;
  }
  return 0;
}

void work_stop(void) {
  pthread_mutex_lock(&srv.queue_mu);
  queue_stop = 1;
  pthread_cond_broadcast(&srv.queue_cv);
  pthread_mutex_unlock(&srv.queue_mu);
  for (int i = 0; i < srv.n_workers; i++) pthread_join(srv.worker_threads[i], NULL);
  free(srv.worker_threads);
  srv.worker_threads = NULL;
  srv.n_workers = 0;
  if (srv.wake_fd >= 0) close(srv.wake_fd);
  srv.wake_fd = -1;
}

int work_submit(job *j) {
  pthread_mutex_lock(&srv.queue_mu);
  int rc = 0;
  if (queue_stop || atomic_load(&srv.stopping)) rc = LUNA_ESHUTDOWN;
  else if (srv.queue_depth >= srv.cfg.max_queue) rc = LUNA_EBUSY;
  else {
    j->next = NULL;
    if (srv.queue_tail) srv.queue_tail->next = j;
    else srv.queue_head = j;
    srv.queue_tail = j;
    srv.queue_depth++;
    pthread_cond_signal(&srv.queue_cv);
  }
  pthread_mutex_unlock(&srv.queue_mu);
  return rc;
}

job *work_take_done(void) {
  uint64_t v;
  if (srv.wake_fd >= 0) { /* closed by work_stop */
    ssize_t r = read(srv.wake_fd, &v, sizeof v);
    (void)r;
  }
  pthread_mutex_lock(&srv.done_mu);
  job *j = srv.done_head;
  srv.done_head = srv.done_tail = NULL;
  pthread_mutex_unlock(&srv.done_mu);
  return j;
}

int work_idle(void) {
  pthread_mutex_lock(&srv.queue_mu);
  int idle = srv.queue_depth == 0 && srv.in_flight == 0;
  pthread_mutex_unlock(&srv.queue_mu);
  pthread_mutex_lock(&srv.done_mu);
  idle = idle && srv.done_head == NULL;
  pthread_mutex_unlock(&srv.done_mu);
  return idle;
}

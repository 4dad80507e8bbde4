/* main.c -- lunad: start-up, configuration, and the process's life from listen to exit */
/* SPDX-License-Identifier: MIT */
#include "server/server.h"

#include "core/log.h"
#include "ops/ops.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

server srv = {
    .queue_mu = PTHREAD_MUTEX_INITIALIZER,
    .queue_cv = PTHREAD_COND_INITIALIZER,
    .done_mu = PTHREAD_MUTEX_INITIALIZER,
    .wake_fd = -1,
};

double srv_now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

double srv_rss_bytes(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  long size = 0, res = 0;
  if (f) {
    if (fscanf(f, "%ld %ld", &size, &res) != 2) res = 0;
    fclose(f);
  }
  return (double)res * (double)sysconf(_SC_PAGESIZE);
}

static int read_token(const char *path, char *err) {
  FILE *f = fopen(path, "rb");
  if (!f) return luna_fail(err, LUNA_EIO, "--token-file %s: %s", path, strerror(errno));
  char buf[4097];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  int toolong = !feof(f) && fgetc(f) != EOF;
  fclose(f);
  if (toolong) return luna_fail(err, LUNA_EINVAL, "--token-file %s: longer than 4096 bytes", path);
  while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) n--;
  if (!n) return luna_fail(err, LUNA_EINVAL, "--token-file %s: empty", path);
  if (memchr(buf, 0, n)) return luna_fail(err, LUNA_EINVAL, "--token-file %s: contains a NUL byte", path);
  if (n < 16) log_warn("--token-file %s: the token has only %zu bytes; use at least 16 random ones", path, n);
  srv.token = malloc(n + 1);
  if (!srv.token) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  memcpy(srv.token, buf, n);
  srv.token[n] = 0;
  srv.token_len = n;
  return 0;
}

int main(int argc, char **argv) {
  ops_blas_setup(argv); /* may re-execute once with better OpenBLAS kernels */
  ops_memory_setup();
  char err[LUNA_ERR_LEN] = "";
  int rc = config_parse_args(&srv.cfg, argc, argv, err);
  if (rc == 1) {
    config_usage(stdout);
    return 0;
  }
  if (rc) {
    fprintf(stderr, "lunad: %s\n", err);
    return 2;
  }
  log_set_level((log_level)srv.cfg.log_level);
  if (!srv.cfg.socket_path) srv.cfg.socket_path = strdup(luna_default_socket());

  /* SIGTERM and SIGINT are read from a signalfd by the loop: block them in every thread */
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);
  srv.start_ms = srv_now_ms();

  if (srv.cfg.token_file && (rc = read_token(srv.cfg.token_file, err))) goto fail_early;
  if (srv.cfg.tokenizer_dir && (rc = tok_vocab_load(srv.cfg.tokenizer_dir, &srv.vocab, err))) goto fail_early;
  if ((rc = registry_init(err))) goto fail_early;
  if ((rc = lcache_init(err))) goto fail_early;
  if (!srv.cfg.n_models_dirs) log_warn("no --models-dir: clients can name no model");
  if ((rc = work_start(err))) goto fail_early;
  log_info("%d worker(s), %s threads each, OpenBLAS kernels %s, weights kept as %s", srv.cfg.workers,
           srv.cfg.threads_per_worker ? "fixed" : "one per CPU", ops_blas_core(), srv.cfg.weight_f32 ? "fp32" : "fp16");
  log_info("LoRA mode %s, cache budget %llu MiB, %d LoRA folder(s)", lexec_mode_name(srv.cfg.lora_mode),
           (unsigned long long)(srv.cfg.lora_cache_mem >> 20), srv.cfg.n_loras_dirs);
  rc = loop_run(err);
  work_stop();
  loop_finish();
  registry_free();
  lcache_free();
  rcache_free();
  tok_vocab_free(srv.vocab);
  free(srv.token);
  if (rc) goto fail;
  config_free();
  return 0;
fail:
  log_error("%s", err);
  config_free();
  return 1;
fail_early:
  log_error("%s", err);
  registry_free();
  lcache_free();
  tok_vocab_free(srv.vocab);
  free(srv.token);
  config_free();
  return 1;
}

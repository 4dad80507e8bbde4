/* client_smoke.c -- a program that knows only include/luna.h, built by test_client_proto.py against libluna.a and libluna.so */
/* SPDX-License-Identifier: MIT */
/*
** usage: client_smoke SOCKET
** Talks to the test's fake lunad and prints one line per step; the test compares them.
*/
#include "luna.h"
#include "luna_proto.h"

#include <stdio.h>
#include <string.h>

#define TOKENS "{\"l\": [[[49406, 1.0], [320, 1.5], [49407, 1.0]]]}"

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: client_smoke SOCKET\n");
    return 2;
  }
  luna_client *c = NULL;
  int rc = luna_client_connect_unix(argv[1], &c);
  printf("connect %d '%s'\n", rc, luna_client_errmsg(c));
  if (rc) return 1;
  printf("ping %d\n", luna_client_ping(c));

  char *reply = NULL;
  rc = luna_client_call_json(c, LUNA_MSG_HEALTH, NULL, &reply);
  printf("health %d %s\n", rc, reply ? reply : "(null)");
  luna_free(reply);

  rc = luna_client_call_json(c, LUNA_MSG_MODELS, "{\"action\": \"list\"} ", &reply);
  printf("models %d %s\n", rc, reply ? reply : "(null)");
  luna_free(reply);

  rc = luna_client_call_json(c, LUNA_MSG_MODELS, "[1]", &reply);
  printf("bad-json %d %s null=%d\n", rc, luna_status_name(luna_client_errcode(c)), reply == NULL);

  const char *models[] = {"demo.safetensors"};
  luna_encode_args a = {.models = models, .n_models = 1, .tokens_json = TOKENS, .clip_layer = -2, .deadline_ms = 500,
                        .no_cache = 1};
  luna_encode_result r;
  rc = luna_client_encode(c, &a, &r);
  printf("encode %d family=%s cached=%d cond=[%lld,%lld,%lld] pooled=[%lld,%lld] first=%.9g last=%.9g p0=%.9g\n", rc,
         r.family, r.cached, (long long)r.cond_shape[0], (long long)r.cond_shape[1], (long long)r.cond_shape[2],
         (long long)r.pooled_shape[0], (long long)r.pooled_shape[1], rc ? 0.0 : (double)r.cond[0],
         rc ? 0.0 : (double)r.cond[r.cond_shape[1] * r.cond_shape[2] - 1], rc ? 0.0 : (double)r.pooled[0]);
  luna_encode_result_free(&r);

  const char *missing[] = {"missing.safetensors"};
  luna_encode_args b = {.models = missing, .n_models = 1, .text = "a cat"};
  rc = luna_client_encode(c, &b, &r);
  printf("missing %d %d '%s' cond_null=%d\n", rc, luna_client_errcode(c), luna_client_errmsg(c), r.cond == NULL);
  luna_encode_result_free(&r);

  luna_encode_args both = {.models = models, .n_models = 1, .text = "a cat", .tokens_json = TOKENS};
  rc = luna_client_encode(c, &both, &r);
  printf("both %d\n", rc);

  rc = luna_client_ping(c);
  printf("ping-after-error %d '%s'\n", rc, luna_client_errmsg(c));
  luna_client_close(c);
  luna_client_close(NULL);

  rc = luna_client_connect_unix("/nonexistent/luna-smoke.sock", &c);
  printf("connect-missing %d %s\n", rc, strncmp(luna_client_errmsg(c), "ECONN: ", 7) ? "bad-message" : "ECONN-message");
  printf("ping-unconnected %d\n", luna_client_ping(c));
  luna_client_close(c);
  printf("null-errmsg '%s' %d\n", luna_client_errmsg(NULL), luna_client_errcode(NULL));
  return 0;
}

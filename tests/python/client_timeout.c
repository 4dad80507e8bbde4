/* client_timeout.c -- luna_client_set_timeout against a lunad that never answers, built by test_client_proto.py */
/* SPDX-License-Identifier: MIT */
/*
** usage: client_timeout SOCKET
** Prints one line per step ("step status message"); the test compares them.
*/
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include "luna.h"

#include <stdio.h>
#include <time.h>

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: client_timeout SOCKET\n");
    return 2;
  }
  luna_client *c = NULL;
  int rc = luna_client_connect_unix(argv[1], &c);
  printf("connect %d %s\n", rc, luna_client_errmsg(c));
  if (rc) return 1;
  rc = luna_client_set_timeout(c, -1);
  printf("negative %d %s\n", rc, luna_client_errmsg(c));
  rc = luna_client_set_timeout(c, 250);
  printf("set %d %s\n", rc, luna_client_errmsg(c));
  double t0 = now_s();
  rc = luna_client_ping(c);
  printf("ping %d %s\n", rc, luna_client_errmsg(c));
  printf("seconds %.3f\n", now_s() - t0);
  rc = luna_client_ping(c);
  printf("again %d %s\n", rc, luna_client_errmsg(c));
  rc = luna_client_set_timeout(c, 100);
  printf("closed %d %s\n", rc, luna_client_errmsg(c));
  luna_client_close(c);
  printf("null %d\n", luna_client_set_timeout(NULL, 100));
  return 0;
}

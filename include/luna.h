/* luna.h -- the public interface of luna: status codes (the client API joins later) */
/* SPDX-License-Identifier: MIT */
/*
** If a function or constant does not appear in this file, it is not a published
** API of luna. Everything under src/ is internal and may change at any time.
*/
#ifndef LUNA_H
#define LUNA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LUNA_API __attribute__((visibility("default")))

/*
** Status codes. Every call returns 0 on success or one of these negative values.
** The numbers are stable: they travel on the wire and are mirrored by the Python
** client. Always add new codes at the end.
*/
#define LUNA_STATUS_MAP(XX)                                                   \
  XX(OK,          0, "success")                                               \
  XX(EINVAL,     -1, "invalid argument")                                      \
  XX(ENOMEM,     -2, "out of memory")                                         \
  XX(EIO,        -3, "input/output error")                                    \
  XX(EFORMAT,    -4, "malformed file")                                        \
  XX(EDTYPE,     -5, "unsupported dtype")                                     \
  XX(EMISSING,   -6, "missing tensor")                                        \
  XX(EUNEXPECTED,-7, "unexpected tensor")                                     \
  XX(ESHAPE,     -8, "tensor shape mismatch")                                 \
  XX(EMODEL,     -9, "unsupported or unrecognised model")                     \
  XX(ETOKENS,   -10, "invalid token input")                                   \
  XX(EJSON,     -11, "invalid JSON")                                          \
  XX(EUTF8,     -12, "invalid UTF-8")                                         \
  XX(EINTERNAL, -13, "internal error")

enum luna_status {
#define LUNA_XX_(name, code, text) LUNA_##name = (code),
  LUNA_STATUS_MAP(LUNA_XX_)
#undef LUNA_XX_
};

/* Size of the message buffers that internal calls fill ('char err[LUNA_ERR_LEN]'). */
#define LUNA_ERR_LEN 512

/* luna_strerror returns a static description of 'status' ("unknown status" if none). */
LUNA_API const char *luna_strerror(int status);

/* luna_status_name returns the code's name without the prefix, e.g. "EFORMAT". */
LUNA_API const char *luna_status_name(int status);

#ifdef __cplusplus
}
#endif
#endif /* LUNA_H */

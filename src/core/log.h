/* log.h -- one line per event on stderr, with a time stamp and a level */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_CORE_LOG_H
#define LUNA_CORE_LOG_H

typedef enum log_level { LOG_ERROR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 } log_level;

/* log_set_level sets the most verbose level printed (default LOG_INFO). */
void log_set_level(log_level l);
/* log_parse_level maps "error", "warn", "info", "debug" to a level; -1 if unknown. */
int log_parse_level(const char *s);
void log_msg(log_level l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)

#endif

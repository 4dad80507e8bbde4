/* commands.h -- the subcommands of the luna CLI, each taking (argc, argv) with argv[0] its name */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_CLI_COMMANDS_H
#define LUNA_CLI_COMMANDS_H

/* Each returns the process exit status: 0 success, 1 failure, 2 usage error. */
int cmd_encode(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_demo_model(int argc, char **argv);

#endif

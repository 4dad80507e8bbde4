/* lora_plan.h -- a LoRA stack bound to a model's text encoders: per-request overlays, merged or functional */
/* SPDX-License-Identifier: MIT */
#ifndef LUNA_LORA_LORA_PLAN_H
#define LUNA_LORA_LORA_PLAN_H

#include "lora/lora.h"
#include "models/textenc.h"

/* One entry of a stack: a parsed file and its strength (ComfyUI's strength_clip). */
typedef struct lora_ref {
  const lora_file *file;
  double strength;
} lora_ref;

typedef enum lora_plan_mode {
  LORA_PLAN_FUNCTIONAL = 0, /* base weights + low-rank terms; full per-request weights built in scratch */
  LORA_PLAN_MERGED = 1,     /* every touched matrix merged once into an fp32 copy (lock and auto modes) */
} lora_plan_mode;

/* What binding a stack to a model found. */
typedef struct lora_report {
  int patched;              /* weight matrices the stack changes */
  int unmapped;             /* text-encoder keys with no target in this model */
  char unmapped_keys[LORA_MAX_REPORT][160];
  int n_keys;
} lora_report;

typedef struct lora_plan lora_plan;

/* lora_plan_build binds 'n' stack entries to the encoders of 's'. Every patch must fit
** its target's shape (errors name the LoRA, the tensor and both shapes); patches whose
** encoder the model lacks (CLIP-G keys on SD1) are reported as unmapped, with the
** files' own unmapped keys. Strength-0 entries change nothing. The plan refers to the
** files and to 's', which must outlive it. MERGED builds the fp32 copies now (its cost
** is the merge); FUNCTIONAL only arranges pointers. */
int lora_plan_build(const te_set *s, const lora_ref *stack, int n, lora_plan_mode mode,
                    lora_plan **out, lora_report *rep, char *err);
/* lora_plan_build_reusing is lora_plan_build (MERGED) taking its fp32 buffers from 'old'
** (a merged plan about to be dropped, or NULL) where the sizes match: switching stacks
** then touches no fresh pages. 'old' must still be freed; its taken buffers are gone. */
int lora_plan_build_reusing(const te_set *s, const lora_ref *stack, int n, lora_plan *old,
                            lora_plan **out, lora_report *rep, char *err);
void lora_plan_free(lora_plan *p);
/* Bytes the plan holds (merged copies). */
size_t lora_plan_bytes(const lora_plan *p);
/* The per-encoder overlay that clip_text_forward takes (NULL when the plan leaves that encoder alone). */
const struct clip_overlay *lora_plan_overlay(const lora_plan *p, int enc);

#endif

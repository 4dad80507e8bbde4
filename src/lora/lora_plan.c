/* lora_plan.c -- binds a LoRA stack to a model's encoders as overlays: low-rank terms, built or merged weights */
/* SPDX-License-Identifier: MIT */
#include "lora/lora_plan.h"

#include "core/status.h"

#include <cblas.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The patches of a stack that touch one matrix, in stack order. */
typedef struct mat_list {
  const lora_patch **p;
  double *strength;
  int n, cap;
  int all_lowrank;
} mat_list;

typedef struct enc_plan {
  const clip_text *m;
  int n_mats;                 /* n_layers * 6 + 1 */
  mat_list *lists;
  clip_mat_patch *mats;
  clip_overlay ov;
  int touched;
} enc_plan;

struct lora_plan {
  lora_plan_mode mode;
  enc_plan enc[2];
  clip_lowrank *terms;        /* every term, pointed to by the mats */
  float **merged;             /* merged copies (MERGED mode) */
  size_t *merged_floats;      /* their sizes */
  int n_merged;
  size_t bytes;
};

static const char *const mat_names[CLIP_MAT_N] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2", "text_projection"};

static int list_add(mat_list *l, const lora_patch *p, double s) {
  if (l->n == l->cap) {
    int cap = l->cap ? 2 * l->cap : 2;
    const lora_patch **np = realloc(l->p, (size_t)cap * sizeof *np);
    if (!np) return -1;
    l->p = np;
    double *ns = realloc(l->strength, (size_t)cap * sizeof *ns);
    if (!ns) return -1;
    l->strength = ns;
    l->cap = cap;
  }
  l->p[l->n] = p;
  l->strength[l->n] = s;
  l->n++;
  return 0;
}

/* Count 'n' unmapped keys, keeping the first names. */
static void add_unmapped(lora_report *rep, const char *name, int n) {
  if (!rep) return;
  if (rep->n_keys < LORA_MAX_REPORT) snprintf(rep->unmapped_keys[rep->n_keys++], sizeof rep->unmapped_keys[0], "%s", name);
  rep->unmapped += n;
}

/* The build callback of a matrix: every patch of its list, in order, in fp32. A plain
** LoRA goes straight into the weight, W += c * up @ down in one GEMM (the same sum as
** ComfyUI's, rounded once less: well inside the modes' 1e-5 agreement). */
static int build_list(const void *ud, float *w, char *err) {
  const mat_list *l = ud;
  for (int i = 0; i < l->n; i++) {
    const lora_patch *p = l->p[i];
    if (lora_patch_is_lowrank(p)) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)p->out, (blasint)p->in, (blasint)p->rank,
                  lora_patch_coef(p, l->strength[i]), p->up, (blasint)p->rank, p->down, (blasint)p->in, 1.0f, w,
                  (blasint)p->in);
      continue;
    }
    int rc = lora_patch_apply(p, l->strength[i], w, err);
    if (rc) return rc;
  }
  return 0;
}

void lora_plan_free(lora_plan *p) {
  if (!p) return;
  for (int e = 0; e < 2; e++) {
    enc_plan *ep = &p->enc[e];
    for (int i = 0; ep->lists && i < ep->n_mats; i++) {
      free(ep->lists[i].p);
      free(ep->lists[i].strength);
    }
    free(ep->lists);
    free(ep->mats);
  }
  for (int i = 0; i < p->n_merged; i++) free(p->merged[i]);
  free(p->merged);
  free(p->merged_floats);
  free(p->terms);
  free(p);
}

size_t lora_plan_bytes(const lora_plan *p) { return p ? p->bytes : 0; }

const clip_overlay *lora_plan_overlay(const lora_plan *p, int enc) {
  if (!p || enc < 0 || enc > 1 || !p->enc[enc].touched) return NULL;
  return &p->enc[enc].ov;
}

/* Place one patch of 'f' (at 'strength') in its matrix's list, after checking it fits. */
static int bind_patch(lora_plan *plan, const lora_file *f, const lora_patch *pt, double strength, lora_report *rep,
                      char *err) {
  enc_plan *ep = &plan->enc[pt->enc == 1 ? 1 : 0];
  if (!ep->m) { /* CLIP-G keys on an SD1 model: nothing to patch, as in ComfyUI */
    add_unmapped(rep, pt->name, pt->n_tensors);
    return 0;
  }
  const clip_hparams *hp = clip_text_hparams(ep->m);
  clip_mat which = (clip_mat)pt->module;
  if (which == CLIP_MAT_PROJ && (pt->enc == 0 || !hp->d_proj)) return 0; /* a projection no output uses */
  if (which != CLIP_MAT_PROJ && (pt->layer < 0 || pt->layer >= hp->n_layers)) {
    add_unmapped(rep, pt->name, pt->n_tensors); /* a layer this model does not have */
    return 0;
  }
  const ops_mat *W = clip_text_matrix(ep->m, pt->layer, which);
  if (!W) {
    add_unmapped(rep, pt->name, pt->n_tensors);
    return 0;
  }
  if (W->rows != pt->out || W->cols != pt->in) {
    char where[64];
    if (which == CLIP_MAT_PROJ) snprintf(where, sizeof where, "text_projection");
    else snprintf(where, sizeof where, "layer %d %s", pt->layer, mat_names[which]);
    return luna_fail(err, LUNA_ESHAPE, "LoRA %s: '%s' changes a [%lld, %lld] weight, but CLIP-%s %s is [%lld, %lld]",
                     f->source, pt->name, (long long)pt->out, (long long)pt->in, pt->enc ? "G" : "L", where,
                     (long long)W->rows, (long long)W->cols);
  }
  if (pt->kind == LORA_K_LORA && (pt->rank > W->rows || pt->rank > W->cols))
    return luna_fail(err, LUNA_ESHAPE, "LoRA %s: '%s' has rank %lld, above the %lld x %lld weight's dimensions",
                     f->source, pt->name, (long long)pt->rank, (long long)W->rows, (long long)W->cols);
  if (strength == 0.0) return 0; /* W + 0 * dW == W: ComfyUI's result is the base weight */
  int idx = which == CLIP_MAT_PROJ ? hp->n_layers * 6 : pt->layer * 6 + (int)which;
  if (list_add(&ep->lists[idx], pt, strength)) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  return 0;
}

/* A buffer of 'n' floats from a plan being dropped, or NULL. */
static float *take(lora_plan *old, size_t n) {
  for (int i = 0; old && i < old->n_merged; i++)
    if (old->merged[i] && old->merged_floats[i] == n) {
      float *w = old->merged[i];
      old->merged[i] = NULL;
      old->bytes -= n * sizeof(float);
      return w;
    }
  return NULL;
}

/* MERGED: the base widened to fp32 with every patch applied, once. */
static int merge_one(lora_plan *plan, lora_plan *old, const ops_mat *W, mat_list *l, clip_mat_patch *mp, char *err) {
  size_t n = (size_t)(W->rows * W->cols);
  float *w = take(old, n);
  if (!w) w = malloc(n * sizeof(float));
  if (!w) return luna_fail(err, LUNA_ENOMEM, "out of memory merging a %lld x %lld weight", (long long)W->rows,
                           (long long)W->cols);
  plan->merged_floats[plan->n_merged] = n;
  plan->merged[plan->n_merged++] = w;
  plan->bytes += n * sizeof(float);
  ops_mat_to_f32(W, w);
  int rc = build_list(l, w, err);
  mp->replace = w;
  return rc;
}

static int build(const te_set *s, const lora_ref *stack, int n, lora_plan_mode mode, lora_plan *old,
                 lora_plan **out, lora_report *rep, char *err);

int lora_plan_build(const te_set *s, const lora_ref *stack, int n, lora_plan_mode mode, lora_plan **out,
                    lora_report *rep, char *err) {
  return build(s, stack, n, mode, NULL, out, rep, err);
}

int lora_plan_build_reusing(const te_set *s, const lora_ref *stack, int n, lora_plan *old, lora_plan **out,
                            lora_report *rep, char *err) {
  return build(s, stack, n, LORA_PLAN_MERGED, old, out, rep, err);
}

static int build(const te_set *s, const lora_ref *stack, int n, lora_plan_mode mode, lora_plan *old,
                 lora_plan **out, lora_report *rep, char *err) {
  *out = NULL;
  if (rep) memset(rep, 0, sizeof *rep);
  lora_plan *plan = calloc(1, sizeof *plan);
  if (!plan) return luna_fail(err, LUNA_ENOMEM, "out of memory");
  plan->mode = mode;
  int rc = 0, n_mats_all = 0;
  for (int e = 0; e < 2 && !rc; e++) {
    enc_plan *ep = &plan->enc[e];
    ep->m = te_set_encoder(s, (clip_kind)e);
    if (!ep->m) continue;
    ep->n_mats = clip_text_hparams(ep->m)->n_layers * 6 + 1;
    ep->lists = calloc((size_t)ep->n_mats, sizeof *ep->lists);
    ep->mats = calloc((size_t)ep->n_mats, sizeof *ep->mats);
    if (!ep->lists || !ep->mats) rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
    ep->ov = (clip_overlay){ep->mats, clip_text_hparams(ep->m)->n_layers};
    n_mats_all += ep->n_mats;
  }
  for (int i = 0; i < n && !rc; i++) {
    const lora_file *f = stack[i].file;
    if (stack[i].strength != stack[i].strength || stack[i].strength > 1e30 || stack[i].strength < -1e30) {
      rc = luna_fail(err, LUNA_EINVAL, "LoRA %s: strength must be a finite number", f->source);
      break;
    }
    for (int u = 0; u < f->n_unmapped; u++) {
      if (u < LORA_MAX_REPORT && f->unmapped[u]) add_unmapped(rep, f->unmapped[u], 1);
      else if (rep) rep->unmapped++; /* the file kept only the first names */
    }
    for (int k = 0; k < f->n_patches && !rc; k++) rc = bind_patch(plan, f, &f->patches[k], stack[i].strength, rep, err);
  }
  /* count terms, then lay out every matrix */
  int n_terms = 0;
  for (int e = 0; e < 2 && !rc; e++)
    for (int i = 0; i < plan->enc[e].n_mats; i++) {
      mat_list *l = &plan->enc[e].lists[i];
      l->all_lowrank = 1;
      for (int k = 0; k < l->n; k++)
        if (!lora_patch_is_lowrank(l->p[k])) l->all_lowrank = 0;
      if (l->n && l->all_lowrank) n_terms += l->n;
    }
  if (!rc && n_terms && !(plan->terms = calloc((size_t)n_terms, sizeof *plan->terms)))
    rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
  if (!rc && mode == LORA_PLAN_MERGED && n_mats_all &&
      (!(plan->merged = calloc((size_t)n_mats_all, sizeof *plan->merged)) ||
       !(plan->merged_floats = calloc((size_t)n_mats_all, sizeof *plan->merged_floats))))
    rc = luna_fail(err, LUNA_ENOMEM, "out of memory");
  int t = 0;
  for (int e = 0; e < 2 && !rc; e++) {
    enc_plan *ep = &plan->enc[e];
    int n_layers = ep->m ? clip_text_hparams(ep->m)->n_layers : 0;
    for (int i = 0; i < ep->n_mats && !rc; i++) {
      mat_list *l = &ep->lists[i];
      if (!l->n) continue;
      clip_mat_patch *mp = &ep->mats[i];
      const ops_mat *W = i == n_layers * 6 ? clip_text_matrix(ep->m, 0, CLIP_MAT_PROJ)
                                           : clip_text_matrix(ep->m, i / 6, (clip_mat)(i % 6));
      ep->touched = 1;
      if (rep) rep->patched++;
      if (mode == LORA_PLAN_MERGED) {
        rc = merge_one(plan, old, W, l, mp, err);
      } else if (l->all_lowrank) {
        mp->terms = &plan->terms[t];
        mp->n_terms = l->n;
        for (int k = 0; k < l->n; k++)
          plan->terms[t++] = (clip_lowrank){l->p[k]->down, l->p[k]->up, l->p[k]->rank,
                                            lora_patch_coef(l->p[k], l->strength[k])};
      } else {
        mp->build = build_list;
        mp->build_ud = l;
      }
    }
  }
  if (rc) {
    lora_plan_free(plan);
    return rc;
  }
  *out = plan;
  return 0;
}

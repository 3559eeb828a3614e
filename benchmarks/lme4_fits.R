# lme4's side of the pipeline benchmark (benchmarks/pipeline, make bench): the same fits on the same CSV.
#
#   Rscript benchmarks/lme4_fits.R data.csv [criterion] [name=formula ...]
#
# criterion is "bic" (default) or "aic". Without name=formula arguments it fits the benchmark's three
# candidates. It reads the CSV (timed apart from the fits), fits every candidate by ML with
# lmer(..., REML = FALSE) and default lmerControl(), selects the smallest AIC or BIC as lme4 computes
# them (df = fixed effects + theta + 1, BIC with n = rows), refits the selected one with REML = TRUE and
# prints one JSON object on stdout: per-fit elapsed seconds (system.time()[["elapsed"]]), logLik, AIC,
# BIC, df and lme4's convergence messages. Nothing is rounded except the seconds (to 0.1 ms).
#
# Conventions as tests/reference/make_reference.R: patient_id and arm become factors under the C
# collation, so levels (and the name "armtreatment") follow Python's sorted(str) order; every other
# column stays numeric. Needs R with lme4 and jsonlite
# (Debian: apt-get install -y r-base-core r-cran-lme4 r-cran-jsonlite).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C"))

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 1) {
  stop("usage: Rscript benchmarks/lme4_fits.R data.csv [bic|aic] [name=formula ...]")
}
path <- args[[1]]
criterion <- if (length(args) >= 2) tolower(args[[2]]) else "bic"
if (!criterion %in% c("aic", "bic")) {
  stop("criterion must be 'aic' or 'bic', got '", criterion, "'")
}
candidates <- c(
  ri = "score ~ week * arm + age + (1 | patient_id)",
  ris = "score ~ week * arm + age + (week | patient_id)",
  ris_uncorrelated = "score ~ week * arm + age + (week || patient_id)"
)
if (length(args) >= 3) {
  pairs <- args[3:length(args)]
  if (!all(grepl("=", pairs, fixed = TRUE))) {
    stop("candidates must be given as name=formula, got: ", paste(pairs, collapse = " "))
  }
  candidates <- setNames(sub("^[^=]*=", "", pairs), sub("=.*$", "", pairs))
}

read_seconds <- system.time({
  frame <- read.csv(path, stringsAsFactors = FALSE)
  for (column in intersect(c("patient_id", "arm"), names(frame))) {
    frame[[column]] <- factor(as.character(frame[[column]]))
  }
})[["elapsed"]]

fit_one <- function(formula, reml) {
  fit <- NULL
  seconds <- system.time(
    fit <- lmer(as.formula(formula), data = frame, REML = reml)
  )[["elapsed"]]
  ll <- logLik(fit)
  list(
    formula = formula,
    method = if (reml) "REML" else "ML",
    seconds = round(seconds, 4),
    loglik = as.numeric(ll),
    df = attr(ll, "df"),
    aic = AIC(fit),
    bic = BIC(fit),
    singular = isSingular(fit),
    messages = as.list(c(fit@optinfo$conv$lme4$messages, fit@optinfo$warnings))
  )
}

fits <- lapply(candidates, fit_one, reml = FALSE)
scores <- vapply(fits, function(f) f[[criterion]], numeric(1))
selected <- names(candidates)[which.min(scores)]
refit <- fit_one(candidates[[selected]], reml = TRUE)

out <- list(
  data = normalizePath(path),
  rows = nrow(frame),
  subjects = nlevels(frame$patient_id),
  criterion = criterion,
  read_seconds = round(read_seconds, 4),
  fits = fits,
  selected = selected,
  refit = refit,
  fit_seconds_total = round(sum(vapply(fits, function(f) f$seconds, numeric(1))) + refit$seconds, 4),
  versions = list(
    R = paste(R.version$major, R.version$minor, sep = "."),
    lme4 = as.character(packageVersion("lme4")),
    Matrix = as.character(packageVersion("Matrix"))
  )
)
cat(toJSON(out, auto_unbox = TRUE, digits = NA, null = "null", pretty = TRUE), "\n")

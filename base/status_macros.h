// Early-return macros for absl::Status / absl::StatusOr, the project's spelling of Abseil's
// internal RETURN_IF_ERROR / ASSIGN_OR_RETURN (Debian's Abseil does not ship them).
#ifndef POLYSKETCH_BASE_STATUS_MACROS_H_
#define POLYSKETCH_BASE_STATUS_MACROS_H_

#include <utility>

#include <absl/status/status.h>
#include <absl/status/statusor.h>

// PS_RETURN_IF_ERROR(expr): evaluates `expr` (an absl::Status) once; if it is not OK, returns it
// from the enclosing function, which must return absl::Status or absl::StatusOr<T>.
//
//   PS_RETURN_IF_ERROR(CheckHeader(bytes));
#define PS_RETURN_IF_ERROR(expr)                                \
  do {                                                          \
    if (::absl::Status ps_status_ = (expr); !ps_status_.ok()) { \
      return ps_status_;                                        \
    }                                                           \
  } while (false)

// PS_ASSIGN_OR_RETURN(lhs, rexpr): evaluates `rexpr` (an absl::StatusOr<T>) once; if it holds an
// error, returns that status from the enclosing function; otherwise moves the value into `lhs`,
// which may be a declaration (`MappedFile file`, `auto file`) or an existing variable. Expands to
// several statements: use it on its own, never as the body of an unbraced if/else. A `lhs` with a
// top-level comma (`std::pair<int, int> p`) needs a type alias.
//
//   PS_ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(path));
#define PS_ASSIGN_OR_RETURN(lhs, rexpr) \
  PS_ASSIGN_OR_RETURN_IMPL_(PS_STATUS_MACROS_CONCAT_(ps_statusor_, __COUNTER__), lhs, rexpr)

// Implementation details of the macros above.
#define PS_STATUS_MACROS_CONCAT_INNER_(x, y) x##y
#define PS_STATUS_MACROS_CONCAT_(x, y) PS_STATUS_MACROS_CONCAT_INNER_(x, y)
#define PS_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                              \
  if (!statusor.ok()) {                                 \
    return std::move(statusor).status();                \
  }                                                     \
  lhs = *std::move(statusor)

#endif  // POLYSKETCH_BASE_STATUS_MACROS_H_

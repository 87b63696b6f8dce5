// Layout tables: how an op family's integer codes and packed arrays are laid out (the fields of
// `int[] flags`, the rows of `row_stats`, the slots of `Tensor?[] inputs`, estimator codes...),
// defined once per family with an X-macro list
//
//   #define RLKERN_PL_ROW_STATS(X) X(kLen, "len") X(kPgSum, "pg_sum") ...
//   enum RowStat : int { RLKERN_PL_ROW_STATS(RLKERN_LAYOUT_ENUM) kNumRowStats };
//   RLKERN_LAYOUT_NAMES(kRowStatNames, RLKERN_PL_ROW_STATS);
//
// so that the C++ enum and the names exported through rlkern._C (csrc/module.cpp, read by
// python/rlkern/config/layout.py and handed to the Triton launchers) can never disagree: a new
// entry is one line in the list. Torch-free, host + device.
#pragma once

#define RLKERN_LAYOUT_ENUM(id, text) id,
#define RLKERN_LAYOUT_TEXT(id, text) text,
#define RLKERN_LAYOUT_NAMES(array, LIST) \
  inline constexpr const char* array[] = {LIST(RLKERN_LAYOUT_TEXT)}

namespace rlkern {

// One named table of a family: `names[i]` is the name of code / index i.
struct LayoutTable {
  const char* table;
  const char* const* names;
  int size;
};

template <int N>
constexpr LayoutTable layout_table(const char* table, const char* const (&names)[N]) {
  return LayoutTable{table, names, N};
}

}  // namespace rlkern
